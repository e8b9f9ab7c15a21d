// efa::attention_keys, attention_queries and their backward for CUDA tensors: the CPU operators'
// checks (attention_checks.h), then per chunk of consecutive atoms of one structure the rows
// kernel of attention.cu and one cuBLAS product (at::addmm_ / at::mm_out) with the structure's
// KV, as ops/fused_efa.cpp does per chunk on the CPU; backward makes the rows' gradient by
// cuBLAS and the backward kernel turns it into the channels' and positions' gradients. Nothing
// per atom x grid outlives a chunk. Unowned atoms enter stage 1 with zero values (the CPU
// operator skips them): the same sums, and zero gradients. Autograd is the CPU operators'.
// Compiled only with EFA_CUDA (ops/CMakeLists.txt).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../attention_checks.h"
#include "attention.h"
#include "torch_side.h"

namespace efa {
namespace {

using torch::Tensor;

constexpr int64_t kChunkBytes = int64_t(64) << 20;  // one chunk's rows

void check_cuda(const char *op, const AttentionSizes &z, std::initializer_list<const Tensor *> tensors)
{
  cuda::require_one_cuda_device(op, tensors);
  TORCH_CHECK(z.channels <= cuda::kMaxChannels, op, " on CUDA: at most ", cuda::kMaxChannels,
              " frequency channels, got ", z.channels);
}

// A chunk: atoms start .. start + count - 1, all of structure b.
struct Chunk {
  int64_t structure, start, count;
};

// The runs of equal structure index in batch, cut into chunks of at most `rows` atoms (one
// device-to-host copy of the runs per call); every index must be 0 .. n_structures - 1.
std::vector<Chunk> chunks_of(const char *op, const Tensor &batch, int64_t n_structures, int64_t rows)
{
  std::vector<Chunk> out;
  if (batch.numel() == 0) return out;
  const auto runs = at::unique_consecutive(batch, /*return_inverse=*/false, /*return_counts=*/true);
  const Tensor index = std::get<0>(runs).cpu(), counts = std::get<2>(runs).cpu();
  const int64_t *b = index.data_ptr<int64_t>(), *n = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t r = 0; r < index.numel(); ++r) {
    TORCH_CHECK(b[r] >= 0 && b[r] < n_structures, op, ": an atom is in structure ", b[r], " but there are ",
                n_structures, " structures (batch must hold 0 .. n_structures - 1)");
    for (int64_t first = 0; first < n[r]; first += rows)
      out.push_back({b[r], start + first, std::min(rows, n[r] - first)});
    start += n[r];
  }
  return out;
}

// Per-call state: the kernels' arguments for one channel tensor, the chunks and the rows buffer.
template <typename T>
struct Stage {
  Stage(const char *op, const AttentionSizes &z_in, const Tensor &positions, const Tensor &channels,
        const Tensor &omega_in, const Tensor &directions_in, const Tensor &batch)
      : z(z_in),
        omega(omega_in.to(positions.options()).contiguous()),
        directions(directions_in.to(positions.options()).contiguous()),
        args{positions.data_ptr<T>(), channels.data_ptr<T>(), omega.data_ptr<T>(), directions.data_ptr<T>(),
             z.channels, z.directions},
        rows(std::max<int64_t>(1, std::min<int64_t>(z.atoms, kChunkBytes / std::max<int64_t>(1, z.width() * sizeof(T))))),
        chunks(chunks_of(op, batch, z.structures, rows)),
        buffer(at::empty({rows, z.width()}, positions.options())),
        stream(cuda::current_stream(positions))
  {
  }

  // the chunk's rows, made (count x 2MG)
  Tensor make_rows(const Chunk &c)
  {
    cuda::attention_rows<T>(args, c.start, c.count, buffer.data_ptr<T>(), stream);
    return buffer.narrow(0, 0, c.count);
  }

  void rows_backward(const Chunk &c, const Tensor &grad_rows, Tensor &g_channels, Tensor &g_positions)
  {
    const Tensor g = grad_rows.contiguous();
    cuda::attention_rows_backward<T>(args, c.start, c.count, g.data_ptr<T>(), g_channels.data_ptr<T>(),
                                     g_positions.data_ptr<T>(), stream);
  }

  Tensor matrix(const Tensor &kv, int64_t b) const { return kv.select(0, b).view({z.width(), z.columns}); }

  const AttentionSizes z;
  const Tensor omega, directions;
  const cuda::AttentionArgs<T> args;
  const int64_t rows;
  const std::vector<Chunk> chunks;
  Tensor buffer;
  void *stream;
};

Tensor keys_cuda(const Tensor &positions_in, const Tensor &keys_in, const Tensor &values_in, const Tensor &owned_in,
                 const Tensor &batch_in, int64_t n_structures, const Tensor &omega, const Tensor &directions)
{
  const char *op = "efa::attention_keys";
  const AttentionSizes z = check_keys(positions_in, keys_in, values_in, owned_in, batch_in, n_structures, omega,
                                      directions);
  check_cuda(op, z, {&positions_in, &keys_in, &values_in, &owned_in, &batch_in, &omega, &directions});
  const c10::DeviceGuard guard(positions_in.device());
  const Tensor positions = positions_in.contiguous(), keys = keys_in.contiguous(), batch = batch_in.contiguous();
  const Tensor masked = values_in * owned_in.unsqueeze(1);
  Tensor kv = at::zeros({z.structures, z.channels, z.directions, 2 * z.columns}, values_in.options());
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "efa::attention_keys (CUDA)", [&] {
    Stage<scalar_t> stage(op, z, positions, keys, omega, directions, batch);
    for (const Chunk &c : stage.chunks)
      stage.matrix(kv, c.structure).addmm_(stage.make_rows(c).t(), masked.narrow(0, c.start, c.count));
  });
  return kv;
}

Tensor queries_cuda(const Tensor &positions_in, const Tensor &queries_in, const Tensor &kv_in, const Tensor &batch_in,
                    const Tensor &omega, const Tensor &directions)
{
  const char *op = "efa::attention_queries";
  const AttentionSizes z = check_queries(positions_in, queries_in, kv_in, batch_in, omega, directions);
  check_cuda(op, z, {&positions_in, &queries_in, &kv_in, &batch_in, &omega, &directions});
  const c10::DeviceGuard guard(positions_in.device());
  const Tensor positions = positions_in.contiguous(), queries = queries_in.contiguous(), kv = kv_in.contiguous();
  const Tensor batch = batch_in.contiguous();
  Tensor y = at::zeros({z.atoms, z.columns}, kv.options());
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "efa::attention_queries (CUDA)", [&] {
    Stage<scalar_t> stage(op, z, positions, queries, omega, directions, batch);
    for (const Chunk &c : stage.chunks) {
      Tensor part = y.narrow(0, c.start, c.count);
      at::mm_out(part, stage.make_rows(c), stage.matrix(kv, c.structure));
    }
  });
  return y;
}

using Grads = std::tuple<Tensor, Tensor, Tensor>;

Grads keys_backward_cuda(const Tensor &grad_kv_in, const Tensor &positions_in, const Tensor &keys_in,
                         const Tensor &values_in, const Tensor &owned_in, const Tensor &batch_in, const Tensor &omega,
                         const Tensor &directions)
{
  const char *op = "efa::attention_keys_backward";
  const AttentionSizes z = check_keys(positions_in, keys_in, values_in, owned_in, batch_in, grad_kv_in.size(0), omega,
                                      directions);
  TORCH_CHECK(grad_kv_in.sizes() == at::IntArrayRef({z.structures, z.channels, z.directions, 2 * z.columns}), op,
              ": grad_kv has shape ", grad_kv_in.sizes(), ", not KV's");
  check_cuda(op, z, {&grad_kv_in, &positions_in, &keys_in, &values_in, &owned_in, &batch_in, &omega, &directions});
  const c10::DeviceGuard guard(positions_in.device());
  const Tensor grad_kv = grad_kv_in.contiguous(), positions = positions_in.contiguous(), keys = keys_in.contiguous();
  const Tensor batch = batch_in.contiguous(), masked = values_in * owned_in.unsqueeze(1);
  Tensor g_positions = at::zeros_like(positions), g_keys = at::zeros_like(keys);
  Tensor g_masked = at::zeros_like(masked);
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "efa::attention_keys_backward (CUDA)", [&] {
    Stage<scalar_t> stage(op, z, positions, keys, omega, directions, batch);
    for (const Chunk &c : stage.chunks) {
      const Tensor g_kv_b = stage.matrix(grad_kv, c.structure);
      Tensor gm = g_masked.narrow(0, c.start, c.count);
      at::mm_out(gm, stage.make_rows(c), g_kv_b);
      stage.rows_backward(c, at::mm(masked.narrow(0, c.start, c.count), g_kv_b.t()), g_keys, g_positions);
    }
  });
  return {g_positions, g_keys, g_masked * owned_in.unsqueeze(1)};
}

Grads queries_backward_cuda(const Tensor &grad_y_in, const Tensor &positions_in, const Tensor &queries_in,
                            const Tensor &kv_in, const Tensor &batch_in, const Tensor &omega, const Tensor &directions)
{
  const char *op = "efa::attention_queries_backward";
  const AttentionSizes z = check_queries(positions_in, queries_in, kv_in, batch_in, omega, directions);
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({z.atoms, z.columns}), op, ": grad_y has shape ",
              grad_y_in.sizes(), ", not y's (", z.atoms, ", ", z.columns, ")");
  check_cuda(op, z, {&grad_y_in, &positions_in, &queries_in, &kv_in, &batch_in, &omega, &directions});
  const c10::DeviceGuard guard(positions_in.device());
  const Tensor grad_y = grad_y_in.contiguous(), positions = positions_in.contiguous();
  const Tensor queries = queries_in.contiguous(), kv = kv_in.contiguous(), batch = batch_in.contiguous();
  Tensor g_positions = at::zeros_like(positions), g_queries = at::zeros_like(queries), g_kv = at::zeros_like(kv);
  AT_DISPATCH_FLOATING_TYPES(positions.scalar_type(), "efa::attention_queries_backward (CUDA)", [&] {
    Stage<scalar_t> stage(op, z, positions, queries, omega, directions, batch);
    for (const Chunk &c : stage.chunks) {
      const Tensor gy = grad_y.narrow(0, c.start, c.count);
      stage.matrix(g_kv, c.structure).addmm_(stage.make_rows(c).t(), gy);
      stage.rows_backward(c, at::mm(gy, stage.matrix(kv, c.structure).t()), g_queries, g_positions);
    }
  });
  return {g_positions, g_queries, g_kv};
}

}  // namespace

TORCH_LIBRARY_IMPL(efa, CUDA, m)
{
  m.impl("attention_keys", keys_cuda);
  m.impl("attention_keys_backward", keys_backward_cuda);
  m.impl("attention_queries", queries_cuda);
  m.impl("attention_queries_backward", queries_backward_cuda);
}

}  // namespace efa
