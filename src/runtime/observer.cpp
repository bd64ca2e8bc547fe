#include "runtime/observer.h"

#include "runtime/kernels/gemm.h"

namespace pq::runtime {

void WeightGradientCollector::on_linear(const LinearActivity& activity) {
  if (activity.output_grad == nullptr) return;
  auto it = gradients_.find(activity.name);
  if (it == gradients_.end()) {
    it = gradients_
             .emplace(std::string(activity.name),
                      std::vector<float>(activity.out_features * activity.in_features, 0.0f))
             .first;
  }
  if (activity.rows == 0) return;  // an expert no token was routed to: its gradient is zero
  // dW [out, in] += dY^T [out, rows] X [rows, in]
  gemm_f32(Transpose::kYes, Transpose::kNo, activity.out_features, activity.in_features,
           activity.rows, 1.0f, activity.output_grad, activity.out_features, activity.input,
           activity.in_features, 1.0f, it->second.data(), activity.in_features);
}

}  // namespace pq::runtime
