"""Quantization: fake quantizers and QAT layers for training, the real int8 layers and their
GEMMs/kernels for inference, and the conversion of a QAT model to an int8 one.
"""
