// The node update that closes a qeq_ase attention layer (qeq_ase/model/attention.py), fused:
//
//   s' = s + sum_c (v1[c] * v2[c]) * o2 + o3        s, o1, o2, o3   [N, F]
//   v' = v + v3 * o1 + agg_v                         v, v1..3, agg_v [N, 3, F]
//
// with v1 | v2 | v3 = vm [N, 3, 3F] (the vector_mix output) and o1 | o2 | o3 = o [N, 3F] (the
// out linear's output). As eager ops this is eight [N, F]- or [N, 3, F]-sized ops forward and
// about fifteen backward, each a pass over memory; here it is one pass each way, a row per
// node. The gradients of s, v and agg_v are the incoming gradients themselves (residuals), so
// the backward only writes those of vm and o.
//
// Built lazily by qeq_ase/kernels/node_update.py; float32 or float64, contiguous inputs.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <vector>

namespace {

constexpr int64_t kGrain = 16;  // nodes per task: a row of 3F floats is ~1.5 KB at F = 128

void check(const at::Tensor& s, const at::Tensor& vm, const at::Tensor& o) {
  TORCH_CHECK(s.dim() == 2, "node_update: s must be [N, F], got ", s.sizes());
  const int64_t N = s.size(0), F = s.size(1);
  TORCH_CHECK(vm.dim() == 3 && vm.size(0) == N && vm.size(1) == 3 && vm.size(2) == 3 * F,
              "node_update: vm must be [N, 3, 3F] = [", N, ", 3, ", 3 * F, "], got ", vm.sizes());
  TORCH_CHECK(o.dim() == 2 && o.size(0) == N && o.size(1) == 3 * F,
              "node_update: o must be [N, 3F] = [", N, ", ", 3 * F, "], got ", o.sizes());
  for (const auto* t : {&vm, &o})
    TORCH_CHECK(t->scalar_type() == s.scalar_type() && t->is_contiguous(),
                "node_update: inputs must be contiguous and of one dtype");
}

template <typename T>
void forward_rows(const T* s, const T* v, const T* vm, const T* o, const T* agg, T* s_out, T* v_out,
                  int64_t begin, int64_t end, int64_t F) {
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict__ vmn = vm + n * 9 * F;
    const T* __restrict__ on = o + n * 3 * F;
    const T* __restrict__ sn = s + n * F;
    T* __restrict__ so = s_out + n * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      T dot = vmn[f] * vmn[F + f];
      dot += vmn[3 * F + f] * vmn[4 * F + f];
      dot += vmn[6 * F + f] * vmn[7 * F + f];
      so[f] = sn[f] + (dot * on[F + f] + on[2 * F + f]);
    }
    for (int64_t c = 0; c < 3; ++c) {
      const T* __restrict__ v3 = vmn + c * 3 * F + 2 * F;
      const T* __restrict__ vn = v + (n * 3 + c) * F;
      const T* __restrict__ an = agg + (n * 3 + c) * F;
      T* __restrict__ vo = v_out + (n * 3 + c) * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) vo[f] = vn[f] + (v3[f] * on[f] + an[f]);
    }
  }
}

// grad_v may be null: the layer's v' is not used (the last layer), so its gradient is zero.
template <typename T>
void backward_rows(const T* gs, const T* gv, const T* vm, const T* o, T* g_vm, T* g_o,
                   int64_t begin, int64_t end, int64_t F) {
  for (int64_t n = begin; n < end; ++n) {
    const T* __restrict__ vmn = vm + n * 9 * F;
    const T* __restrict__ on = o + n * 3 * F;
    const T* __restrict__ gsn = gs + n * F;
    T* __restrict__ gvm = g_vm + n * 9 * F;
    T* __restrict__ gon = g_o + n * 3 * F;
#pragma omp simd
    for (int64_t f = 0; f < F; ++f) {
      T dot = vmn[f] * vmn[F + f];
      dot += vmn[3 * F + f] * vmn[4 * F + f];
      dot += vmn[6 * F + f] * vmn[7 * F + f];
      const T g2 = gsn[f] * on[F + f];  // d s' / d (v1 v2)
      gon[F + f] = gsn[f] * dot;
      gon[2 * F + f] = gsn[f];
      gon[f] = T(0);
      for (int64_t c = 0; c < 3; ++c) {
        gvm[c * 3 * F + f] = g2 * vmn[c * 3 * F + F + f];
        gvm[c * 3 * F + F + f] = g2 * vmn[c * 3 * F + f];
      }
    }
    for (int64_t c = 0; c < 3; ++c) {
      T* __restrict__ gv3 = gvm + c * 3 * F + 2 * F;
      if (gv == nullptr) {
        for (int64_t f = 0; f < F; ++f) gv3[f] = T(0);
        continue;
      }
      const T* __restrict__ gvn = gv + (n * 3 + c) * F;
      const T* __restrict__ v3 = vmn + c * 3 * F + 2 * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        gv3[f] = gvn[f] * on[f];
        gon[f] += gvn[f] * v3[f];
      }
    }
  }
}

std::vector<at::Tensor> node_update_forward(const at::Tensor& s, const at::Tensor& v, const at::Tensor& vm,
                                            const at::Tensor& o, const at::Tensor& agg_v) {
  check(s, vm, o);
  for (const auto* t : {&v, &agg_v})
    TORCH_CHECK(t->dim() == 3 && t->size(0) == s.size(0) && t->size(1) == 3 && t->size(2) == s.size(1) &&
                    t->scalar_type() == s.scalar_type() && t->is_contiguous(),
                "node_update: v and agg_v must be contiguous [N, 3, F] of s's dtype, got ", t->sizes());
  TORCH_CHECK(s.is_contiguous(), "node_update: s must be contiguous");
  const int64_t N = s.size(0), F = s.size(1);
  auto s_out = at::empty_like(s);
  auto v_out = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "node_update_forward", [&] {
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
      forward_rows<scalar_t>(s.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), vm.data_ptr<scalar_t>(),
                             o.data_ptr<scalar_t>(), agg_v.data_ptr<scalar_t>(), s_out.data_ptr<scalar_t>(),
                             v_out.data_ptr<scalar_t>(), b, e, F);
    });
  });
  return {s_out, v_out};
}

std::vector<at::Tensor> node_update_backward(const at::Tensor& grad_s, const c10::optional<at::Tensor>& grad_v,
                                             const at::Tensor& vm, const at::Tensor& o) {
  check(grad_s, vm, o);
  TORCH_CHECK(grad_s.is_contiguous(), "node_update: grad_s must be contiguous");
  const bool has_gv = grad_v.has_value() && grad_v->defined();
  if (has_gv)
    TORCH_CHECK(grad_v->is_contiguous() && grad_v->scalar_type() == grad_s.scalar_type() &&
                    grad_v->numel() == grad_s.numel() * 3,
                "node_update: grad_v must be a contiguous [N, 3, F] of grad_s's dtype");
  const int64_t N = grad_s.size(0), F = grad_s.size(1);
  auto g_vm = at::empty_like(vm);
  auto g_o = at::empty_like(o);
  AT_DISPATCH_FLOATING_TYPES(grad_s.scalar_type(), "node_update_backward", [&] {
    const scalar_t* gv = has_gv ? grad_v->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, N, kGrain, [&](int64_t b, int64_t e) {
      backward_rows<scalar_t>(grad_s.data_ptr<scalar_t>(), gv, vm.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(),
                              g_vm.data_ptr<scalar_t>(), g_o.data_ptr<scalar_t>(), b, e, F);
    });
  });
  return {g_vm, g_o};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &node_update_forward, "s', v' of an attention layer's node update", py::arg("s"), py::arg("v"),
        py::arg("vm"), py::arg("o"), py::arg("agg_v"));
  m.def("backward", &node_update_backward, "gradients of vm and o (those of s, v, agg_v are the incoming ones)",
        py::arg("grad_s"), py::arg("grad_v"), py::arg("vm"), py::arg("o"));
}
