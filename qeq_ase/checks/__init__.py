"""Physics checks of a potential: equivariance (LEE) and NVE energy conservation.
"""
