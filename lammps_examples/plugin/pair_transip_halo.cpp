/* ----------------------------------------------------------------------
   pair_style transip: the per-layer halo exchange (ghosts halo).
------------------------------------------------------------------------- */

#include "pair_transip.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "neighbor.h"
#include "update.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>

using namespace LAMMPS_NS;

/* ----------------------------------------------------------------------
   Halo mode (any number of ranks; ghosts only to cutoff + skin).

   Rows: the owned atoms of mapped types (LAMMPS order), then the ghosts that
   are their neighbours within the cutoff. The model's halo_* methods run the
   network in pieces; between layers the plugin exchanges features:

   forward   pos (leaf) -> halo_edges -> nbr_index, edge, envelope (made leaves)
             h0 = halo_embed(all rows)
             layer l: out_l = halo_layer(l, h_l, ...) on owned rows
                      h_{l+1}: owned rows = out_l, ghost rows = their owners'
                      out_l, through comm->forward_comm(this)
             energies = halo_readout(out_{L-1})
   backward  g = dE/d out_{L-1}; for l = L-1 .. 0:
               autograd: d/d(h_l, edge, envelope) of out_l with weights g
               accumulate d/d(edge, envelope); the ghost rows of d/dh_l go to
               their owners (comm->reverse_comm(this)) and are added to the
               owned rows: that is g for out_{l-1}
             forces = -d/dpos of (edge, envelope) weighted by the accumulated
             gradients, on owned and ghost rows; LAMMPS' reverse communication
             of forces (newton on) sums ghost forces into their owners, and
             virial_fdotr_compute() gives the virial.
   Every rank takes part in every exchange (L-1 forward, L-1 reverse), also
   ranks that own no atom of a mapped type. Features travel as doubles in
   LAMMPS' buffers.

   Exchange cost: on a GPU, copying whole [rows, W] matrices device <-> host
   in every layer costs far more than the layers themselves, so only the
   rows LAMMPS communicates cross: forward, the owned atoms it sends
   ("border" atoms, gathered on the device into border_feat) and the ghost
   rows it fills (ghost_feat, one copy to the device); backward, the ghost
   rows' gradients and the sums received for border atoms. Which atoms
   LAMMPS sends is learnt from pack_forward_comm itself (no Comm internals):
   the set is restarted whenever the neighbour lists were rebuilt (atoms
   renumbered), an exchange that meets an atom outside it reads a host copy
   of all owned rows and adds the atom. Host blocks hold the model's dtype
   (float32 or float64; converted to double only in pack/unpack); received
   gradients are summed in double, as before, so the numbers are unchanged.

   recompute yes: the forward pass (edges, layers) runs without autograd
   graphs, keeping only each layer's input features; the backward pass
   re-runs layer l with autograd just before differentiating it, and the
   edge features at the end, so that one graph at a time is alive. Same
   numbers, about one more forward pass of time, a fraction of the memory.
------------------------------------------------------------------------- */

void PairTransIP::compute_halo()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int64_t W = feature_width;
  const int nlayers = static_cast<int>(num_layers);
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());

  // ---- exchange bookkeeping: ghost rows of the model first in ghost_feat (they go to the
  // device as one block), the other ghosts after them (they only pass through this rank)
  halo_dtype = model_dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  ghost_slot.resize(atom->nghost);
  int other_ghosts = static_cast<int>(nrows - nlocal_rows);
  for (int i = nlocal; i < nall; ++i)
    ghost_slot[i - nlocal] = atom_to_row[i] >= 0 ? static_cast<int>(atom_to_row[i] - nlocal_rows)
                                                 : other_ghosts++;
  if (neighbor->ncalls != border_ncalls || nlocal != border_nlocal ||
      atom->nghost != border_nghost) {    // atoms renumbered: learn the border atoms anew
    border_atoms.clear();
    border_ncalls = neighbor->ncalls;
    border_nlocal = nlocal;
    border_nghost = atom->nghost;
  }
  index_border_atoms();    // model rows change every step

  // A rank without owned atoms of mapped types runs no model but still takes part in every
  // exchange (its ghosts' features pass through it on multi-hop routes).
  const bool active = nlocal_rows > 0;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const bool optimize = jit_optimize == 1;    // default off: faster on CPU and on the H100
  torch::jit::GraphOptimizerEnabledGuard jit_guard(optimize);

  torch::Tensor pos, numbers, q, s, nbr_index, edge, envelope, edge_leaf, env_leaf, h;
  std::vector<torch::Tensor> h_in(nlayers), out(nlayers);
  std::vector<c10::IValue> edge_args;
  auto run_layer = [&](int l, const torch::Tensor &features) {
    return model->method("halo_layer")(
                    {static_cast<int64_t>(l), features, nbr_index, edge_leaf, env_leaf})
        .toTensor();
  };

  // turn exceptions from the model into a LAMMPS error on this rank (MPI_Abort)
  auto guarded = [&](auto &&fn) {
    try {
      fn();
    } catch (const std::exception &e) {
      model_failed(transip::translate_model_error(e));
    }
  };

  if (active) {
    guarded([&] {
      const ModelInputs in = model_inputs();
      phase_times.lap(transip::PhaseTimes::TO_DEVICE);
      pos = in.pos;
      numbers = in.numbers;
      const torch::Tensor &ei = in.edge_i, &ej = in.edge_j;
      q = in.charge;
      s = in.spin;
      pos = pos.detach().requires_grad_(!recompute);
      edge_args = {pos, numbers, ei, ej, nlocal_rows, q, s};
      c10::intrusive_ptr<c10::ivalue::Tuple> res;
      {
        c10::AutoGradMode grad_mode(!recompute);
        res = model->method("halo_edges")(edge_args).toTuple();
      }
      nbr_index = res->elements().at(0).toTensor();
      edge = res->elements().at(1).toTensor();
      envelope = res->elements().at(2).toTensor();
      if (nbr_index.dim() != 2 || nbr_index.size(0) != nlocal_rows)
        throw std::runtime_error("halo_edges() returned a neighbour index of unexpected shape");
      edge_leaf = edge.detach().requires_grad_(true);
      env_leaf = envelope.detach().requires_grad_(true);
      h = model->method("halo_embed")({numbers, q, s}).toTensor();
      if (h.dim() != 2 || h.size(0) != nrows || h.size(1) != W)
        throw std::runtime_error("halo_embed() returned features of unexpected shape");
    });
  }

  // ---- forward, layer by layer
  for (int l = 0; l < nlayers; ++l) {
    if (active) {
      guarded([&] {
        c10::AutoGradMode grad_mode(!recompute);
        h_in[l] = h.detach().requires_grad_(l > 0 && !recompute);
        out[l] = run_layer(l, h_in[l]);
        if (out[l].dim() != 2 || out[l].size(0) != nlocal_rows || out[l].size(1) != W)
          throw std::runtime_error("halo_layer() returned features of unexpected shape");
      });
    }
    if (l + 1 == nlayers) break;
    send_features(active ? out[l].detach() : torch::Tensor());
    if (active) {
      guarded([&] { h = torch::cat({out[l].detach(), ghost_rows_to_device()}); });
      if (recompute) out[l] = torch::Tensor();    // re-run in the backward pass
    }
  }

  torch::Tensor energies;
  auto readout = [&] {
    energies = model->method("halo_readout")({out[nlayers - 1], numbers.narrow(0, 0,
                                                                             nlocal_rows)})
                   .toTensor();
    if (energies.dim() != 1 || energies.size(0) != nlocal_rows)
      throw std::runtime_error("halo_readout() returned energies of unexpected shape");
  };
  if (active && !recompute) guarded(readout);

  // ---- backward, layer by layer
  torch::Tensor g_out, g_edge, g_env;
  for (int l = nlayers - 1; l >= 0; --l) {
    torch::Tensor g_h;
    if (active) {
      guarded([&] {
        if (recompute) {    // this layer's graph, now
          h_in[l] = h_in[l].detach().requires_grad_(l > 0);
          out[l] = run_layer(l, h_in[l]);
          if (l == nlayers - 1) readout();
        }
        std::vector<torch::Tensor> inputs = {edge_leaf, env_leaf};
        if (l > 0) inputs.push_back(h_in[l]);
        std::vector<torch::Tensor> outputs, weights;
        if (l == nlayers - 1) {
          outputs.push_back(energies.sum());
        } else {
          outputs.push_back(out[l]);
          weights.push_back(g_out);
        }
        auto grads = torch::autograd::grad(outputs, inputs, weights, false, false, true);
        for (int k = 0; k < 2; ++k) {
          if (!grads[k].defined()) continue;
          torch::Tensor &acc = k == 0 ? g_edge : g_env;
          acc = acc.defined() ? acc + grads[k] : grads[k];
        }
        if (l > 0) g_h = grads[2].defined() ? grads[2] : torch::zeros_like(h_in[l]);
        h_in[l] = torch::Tensor();
        out[l] = torch::Tensor();
      });
    }
    if (l == 0) break;
    // gradients that ghost rows received go to the owners of those atoms
    g_out = return_ghost_gradients(active ? g_h.detach() : torch::Tensor());
  }

  if (!active) {
    phase_times.lap(transip::PhaseTimes::HALO);    // this rank's exchanges
    return;
  }
  torch::Tensor forces, e_cpu;
  guarded([&] {
    if (recompute) {    // the edge features' graph, now
      pos.requires_grad_(true);
      edge_args[0] = pos;
      auto res = model->method("halo_edges")(edge_args).toTuple();
      edge = res->elements().at(1).toTensor();
      envelope = res->elements().at(2).toTensor();
    }
    std::vector<torch::Tensor> outputs, weights;
    if (g_edge.defined() && edge.requires_grad()) {
      outputs.push_back(edge);
      weights.push_back(g_edge);
    }
    if (g_env.defined() && envelope.requires_grad()) {
      outputs.push_back(envelope);
      weights.push_back(g_env);
    }
    torch::Tensor g_pos;
    if (!outputs.empty())
      g_pos = torch::autograd::grad(outputs, {pos}, weights, false, false, true)[0];
    forces = g_pos.defined() ? (-g_pos).to(torch::kCPU, torch::kFloat64).contiguous()
                             : torch::zeros({nrows, 3}, f64);
    e_cpu = energies.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  });
  phase_times.lap(transip::PhaseTimes::HALO);    // layers, exchanges, results to host
  add_model_results(forces.data_ptr<double>(), e_cpu.data_ptr<double>(), nullptr);
}

/* ----------------------------------------------------------------------
   Halo exchange helpers. Slots: border_atoms lists the atoms that LAMMPS'
   forward communication packs (owned or ghost), owned atoms with model rows
   first, in row order (their rows are border_rows / border_index); for those
   atoms border_feat holds the features to send and border_grad the
   gradients received, by slot.
------------------------------------------------------------------------- */

namespace {

// row `row` of a contiguous [*, W] host block of float or double, as doubles
void load_row(const torch::Tensor &block, int64_t row, double *dst)
{
  const int64_t W = block.size(1);
  if (block.scalar_type() == torch::kFloat32) {
    const float *src = block.data_ptr<float>() + row * W;
    std::copy(src, src + W, dst);
  } else {
    const double *src = block.data_ptr<double>() + row * W;
    std::copy(src, src + W, dst);
  }
}

void store_row(const double *src, torch::Tensor &block, int64_t row)
{
  const int64_t W = block.size(1);
  if (block.scalar_type() == torch::kFloat32)
    std::copy(src, src + W, block.data_ptr<float>() + row * W);
  else
    std::copy(src, src + W, block.data_ptr<double>() + row * W);
}

}    // namespace

// The first `rows` rows of a kept host block [capacity, W] (pinned for CUDA), grown as needed.
torch::Tensor PairTransIP::host_rows(torch::Tensor &block, int64_t rows, int64_t W,
                                     torch::Dtype dtype)
{
  if (!block.defined() || block.size(0) < rows || block.size(1) != W ||
      block.scalar_type() != dtype) {
    auto options = torch::TensorOptions().dtype(dtype);
    if (device.is_cuda()) options = options.pinned_memory(true);
    block = torch::empty({std::max<int64_t>(rows + rows / 8, 1), W}, options);
  }
  return block.narrow(0, 0, rows);
}

// Slots of border_atoms (see above): each step (model rows change) and when atoms were added.
void PairTransIP::index_border_atoms()
{
  const int nlocal = atom->nlocal;
  std::sort(border_atoms.begin(), border_atoms.end());
  border_atoms.erase(std::unique(border_atoms.begin(), border_atoms.end()), border_atoms.end());
  std::stable_partition(border_atoms.begin(), border_atoms.end(),
                        [&](int i) { return i < nlocal && atom_to_row[i] >= 0; });
  border_slot.assign(nlocal + atom->nghost, -1);
  border_rows.clear();
  for (size_t k = 0; k < border_atoms.size(); ++k) {
    const int i = border_atoms[k];
    border_slot[i] = static_cast<int>(k);
    if (i < nlocal && atom_to_row[i] >= 0) border_rows.push_back(atom_to_row[i]);
  }
  const auto rows = torch::from_blob(border_rows.data(), {int64_t(border_rows.size())},
                                     torch::TensorOptions().dtype(torch::kInt64));
  border_index = device.is_cuda() ? rows.to(device) : rows.clone();
}

// border_feat = the rows of halo_out that LAMMPS will send: gathered on the device, one copy.
void PairTransIP::gather_border_rows()
{
  const int64_t n = static_cast<int64_t>(border_rows.size());
  if (!halo_out.defined() || n == 0) return;
  torch::Tensor block = host_rows(border_feat, n, feature_width, halo_dtype);
  if (halo_out.is_cpu() && halo_out.scalar_type() == halo_dtype)
    torch::index_select_out(block, halo_out, 0, border_index);
  else
    block.copy_(halo_out.index_select(0, border_index));
}

// All owned rows of halo_out on the host, for atoms not (yet) in border_atoms: once after each
// reneighbouring, while the border atoms are learnt.
const torch::Tensor &PairTransIP::all_local_rows()
{
  if (!halo_all_local.defined())
    halo_all_local = halo_out.to(torch::kCPU, halo_dtype).contiguous();
  return halo_all_local;
}

// Forward communication of one layer's output (owned rows; undefined on a rank without them).
void PairTransIP::send_features(const torch::Tensor &out_l)
{
  try {
    halo_out = out_l;
    gather_border_rows();
    host_rows(ghost_feat, atom->nghost, feature_width, halo_dtype);
  } catch (const std::exception &e) {
    exchange_failed(e);
  }
  border_new.clear();
  comm->forward_comm(this);
  halo_out = torch::Tensor();
  halo_all_local = torch::Tensor();
  if (!border_new.empty()) {    // learnt new border atoms: slots for them, before the next use
    border_atoms.insert(border_atoms.end(), border_new.begin(), border_new.end());
    index_border_atoms();
  }
}

// The model's ghost rows (first rows of ghost_feat) on the device, in one copy.
torch::Tensor PairTransIP::ghost_rows_to_device()
{
  const int64_t nghost_rows = static_cast<int64_t>(row_to_atom.size()) - nlocal_rows;
  return ghost_feat.narrow(0, 0, nghost_rows).to(device, model_dtype);
}

/* Reverse communication of the ghost rows of g_h (undefined on a rank without model rows);
   returns the owned rows of g_h plus what they received: the gradient of out_{l-1}. Only the
   ghost rows go to the host, only the border rows' sums come back. Sums are accumulated and
   added in double (then rounded to the model's dtype), as the full-buffer version did. */
torch::Tensor PairTransIP::return_ghost_gradients(const torch::Tensor &g_h)
{
  const int nlocal = atom->nlocal;
  const int64_t nghost_rows = static_cast<int64_t>(row_to_atom.size()) - nlocal_rows;
  const int64_t nborder = static_cast<int64_t>(border_atoms.size());
  const int64_t nborder_rows = static_cast<int64_t>(border_rows.size());
  try {
    if (g_h.defined() && nghost_rows > 0)
      host_rows(ghost_feat, nghost_rows, feature_width, halo_dtype)
          .copy_(g_h.narrow(0, nlocal_rows, nghost_rows));
    // a border atom's sum starts at 0 if it is owned, at its own gradient if it is a ghost
    // (multi-hop routes: it passes on what it received plus its own)
    torch::Tensor sums = host_rows(border_grad, nborder, feature_width, torch::kFloat64);
    double *sp = sums.data_ptr<double>();
    const int64_t W = feature_width;
    for (int64_t k = 0; k < nborder; ++k) {
      const int i = border_atoms[k];
      if (i >= nlocal && atom_to_row[i] >= 0)
        load_row(ghost_feat, atom_to_row[i] - nlocal_rows, sp + k * W);
      else
        std::fill(sp + k * W, sp + (k + 1) * W, 0.0);
    }
  } catch (const std::exception &e) {
    exchange_failed(e);
  }
  comm->reverse_comm(this);
  if (!g_h.defined()) return torch::Tensor();
  try {
    torch::Tensor g_local = g_h.narrow(0, 0, nlocal_rows);
    if (nborder_rows == 0) return g_local;
    const torch::Tensor received = border_grad.narrow(0, 0, nborder_rows).to(device);
    const torch::Tensor summed =
        g_local.index_select(0, border_index).to(torch::kFloat64).add_(received);
    return g_local.index_copy(0, border_index, summed.to(model_dtype));
  } catch (const std::exception &e) {
    exchange_failed(e);
  }
}

int PairTransIP::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/,
                                   int * /*pbc*/)
{
  const int nlocal = atom->nlocal;
  const size_t W = static_cast<size_t>(feature_width);
  for (int k = 0; k < n; ++k) {
    const int i = list[k];
    double *dst = buf + size_t(k) * W;
    const int slot = border_slot[i];
    if (i >= nlocal)
      load_row(ghost_feat, ghost_slot[i - nlocal], dst);
    else if (atom_to_row[i] < 0)    // NULL type: no features
      std::fill(dst, dst + W, 0.0);
    else if (slot >= 0)
      load_row(border_feat, slot, dst);
    else
      load_row(all_local_rows(), atom_to_row[i], dst);
    if (slot == -1) {    // first time LAMMPS sends this atom since the reneighbouring
      border_slot[i] = -2;
      border_new.push_back(i);
    }
  }
  return static_cast<int>(n * W);
}

void PairTransIP::unpack_forward_comm(int n, int first, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  const int nlocal = atom->nlocal;
  for (int k = 0; k < n; ++k)
    store_row(buf + size_t(k) * W, ghost_feat, ghost_slot[first + k - nlocal]);
}

int PairTransIP::pack_reverse_comm(int n, int first, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  for (int k = 0; k < n; ++k) {
    const int i = first + k;
    double *dst = buf + size_t(k) * W;
    if (border_slot[i] >= 0)    // a ghost on a multi-hop route: its sum so far
      load_row(border_grad, border_slot[i], dst);
    else if (atom_to_row[i] >= 0)
      load_row(ghost_feat, atom_to_row[i] - nlocal_rows, dst);
    else
      std::fill(dst, dst + W, 0.0);
  }
  return static_cast<int>(n * W);
}

void PairTransIP::unpack_reverse_comm(int n, int *list, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  double *sums = border_grad.data_ptr<double>();
  for (int k = 0; k < n; ++k) {
    const int slot = border_slot[list[k]];
    if (slot < 0)
      error->one(FLERR,
                 "pair_style transip: reverse communication reached atom {} that forward "
                 "communication did not send (internal error)",
                 list[k]);
    double *dst = sums + size_t(slot) * W;
    const double *src = buf + size_t(k) * W;
    for (size_t c = 0; c < W; ++c) dst[c] += src[c];
  }
}

[[noreturn]] void PairTransIP::exchange_failed(const std::exception &e)
{
  error->one(FLERR, "pair_style transip: halo exchange failed at step {}: {}", update->ntimestep,
             transip::last_line_of(transip::error_text(e)));
}
