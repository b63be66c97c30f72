"""Energy, forces and stress of whole systems: neighbour search + network + autograd.

:class:`TransIPPotential` is the scriptable unit that training uses eagerly and the exporter
scripts into the engine file. Everything is in eV and Å; engines convert at their boundary.
"""

from typing import Dict, List, Optional, Tuple

import torch
from ase.data import chemical_symbols
from torch import Tensor, nn

from .config import MAX_ABS_CHARGE, MAX_ATOMIC_NUMBER, MAX_MULTIPLICITY, ModelConfig
from .neighbors import neighbor_pairs, pairs_to_dense
from .transformer import TransIPNetwork

#: Two atoms closer than this (Å) are treated as a broken input, not as physics.
MIN_PAIR_DISTANCE = 1e-2


class TransIPPotential(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cutoff = float(cfg.cutoff)
        self.num_layers = int(cfg.layers)
        self.network = TransIPNetwork(cfg)
        self.register_buffer(
            "supported_elements", torch.zeros(MAX_ATOMIC_NUMBER + 1, dtype=torch.bool)
        )
        self.symbols: List[str] = list(chemical_symbols[: MAX_ATOMIC_NUMBER + 1])
        self.check_inputs = True
        # Engines may set this for large systems: forces/stress from `compute` with one layer's
        # activations in memory at a time (about +30 % time; see _gradients_low_memory).
        self.low_memory = False
        self.min_pair_distance = MIN_PAIR_DISTANCE
        # Engine-facing metadata; the exporter fills these before scripting (see
        # export/CONTRACT.md). format_version 0 means "not an exported file".
        self.format_version = 0
        self.receptive_field = float(cfg.layers * cfg.cutoff)
        self.metadata_json = "{}"
        self.max_atomic_number = MAX_ATOMIC_NUMBER
        self.max_abs_charge = MAX_ABS_CHARGE
        self.max_multiplicity = MAX_MULTIPLICITY

    # ------------------------------------------------------------------ validation
    @torch.jit.export
    def validate(self, positions: Tensor, numbers: Tensor, charge: Tensor, spin: Tensor) -> None:
        """Raise a ValueError naming the first problem in the inputs."""
        n_atoms = positions.shape[0]
        if n_atoms == 0:
            raise ValueError("empty structure: no atoms were given")
        if positions.dim() != 2 or positions.shape[1] != 3:
            raise ValueError("positions must have shape [N, 3]")
        if numbers.shape[0] != n_atoms:
            raise ValueError(
                "got " + str(numbers.shape[0]) + " atomic numbers for " + str(n_atoms) + " atoms"
            )
        finite = torch.isfinite(positions).all(dim=1)
        if not bool(finite.all()):
            bad = int(torch.nonzero(~finite)[0, 0])
            raise ValueError(
                "position of atom " + str(bad) + " is not finite (NaN or inf)"
            )
        in_range = (numbers >= 1) & (numbers <= self.max_atomic_number)
        if not bool(in_range.all()):
            bad = int(torch.nonzero(~in_range)[0, 0])
            raise ValueError(
                "atom " + str(bad) + " has atomic number " + str(int(numbers[bad]))
                + ", outside 1.." + str(self.max_atomic_number)
            )
        known = self.supported_elements[numbers]
        if not bool(known.all()):
            bad = int(torch.nonzero(~known)[0, 0])
            z = int(numbers[bad])
            raise ValueError(
                "element " + self.symbols[z] + " (Z=" + str(z) + ", atom index " + str(bad)
                + ") is not supported by this model; it knows " + ", ".join(self.element_list())
            )
        q = int(charge.reshape(-1)[0])
        if q < -self.max_abs_charge or q > self.max_abs_charge:
            raise ValueError(
                "total charge " + str(q) + " is outside the model's range -"
                + str(self.max_abs_charge) + ".." + str(self.max_abs_charge)
            )
        s = int(spin.reshape(-1)[0])
        if s < 1 or s > self.max_multiplicity:
            raise ValueError(
                "spin multiplicity " + str(s) + " is outside the model's range 1.."
                + str(self.max_multiplicity)
            )

    @torch.jit.export
    def validate_electrons(
        self, total_atomic_number: int, charge: int, multiplicity: int, n_atoms: int
    ) -> None:
        """Raise a ValueError when ``charge`` and ``multiplicity`` are impossible for the system.

        The one electron-count rule every engine applies (engines with domain decomposition
        pass the sums over all ranks): electrons = sum(Z) - charge must be >= 0, and
        multiplicity - 1 unpaired electrons must not exceed them and must share their parity.
        """
        electrons = total_atomic_number - charge
        where = (" (charge " + str(charge) + ", " + str(n_atoms) + " atoms, total atomic number "
                 + str(total_atomic_number) + ")")
        if electrons < 0:
            raise ValueError("charge " + str(charge) + " leaves a negative electron count" + where)
        unpaired = multiplicity - 1
        if unpaired > electrons:
            raise ValueError(
                "multiplicity " + str(multiplicity) + " needs " + str(unpaired)
                + " unpaired electrons but there are only " + str(electrons) + " electrons" + where
            )
        if (electrons - unpaired) % 2 != 0:
            odd = electrons % 2 == 1
            raise ValueError(
                "multiplicity " + str(multiplicity) + " is impossible for " + str(electrons)
                + " electrons" + where + ": an " + ("odd" if odd else "even")
                + " electron count needs an " + ("even" if odd else "odd") + " multiplicity"
            )

    def _validate_system(self, positions: Tensor, numbers: Tensor, charge: Tensor,
                         spin: Tensor) -> None:
        """Inputs of a whole system (not an engine's local + ghost slice): per-atom checks and
        the electron count."""
        self.validate(positions, numbers, charge, spin)
        self.validate_electrons(int(numbers.sum()), int(charge.reshape(-1)[0]),
                                int(spin.reshape(-1)[0]), int(numbers.shape[0]))

    @torch.jit.export
    def element_list(self) -> List[str]:
        out: List[str] = []
        for z in range(1, self.max_atomic_number + 1):
            if bool(self.supported_elements[z]):
                out.append(self.symbols[z])
        return out

    def _prepare(
        self, positions: Tensor, numbers: Tensor, cell: Tensor, pbc: Tensor, charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Cast to the model's dtype and move everything to the model's device.

        Engines may hand over positions on the GPU and the small tensors (numbers, cell, pbc,
        charge, spin) on the CPU; the model's parameters decide where the work happens.
        Positions keep their autograd graph (``.to`` is differentiable).
        """
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        return (
            positions.to(device=device, dtype=dtype),
            numbers.to(device=device, dtype=torch.long),
            cell.to(device=device, dtype=dtype),
            pbc.to(device=device, dtype=torch.bool),
            charge.to(device),
            spin.to(device),
        )

    # ------------------------------------------------------------------ core
    def _check_pair_distances(self, vec: Tensor, i: Tensor, j: Tensor) -> None:
        """Raise a ValueError naming two atoms closer than ``min_pair_distance``."""
        if vec.shape[0] == 0:
            return
        d2 = (vec.detach() * vec.detach()).sum(1)
        k = int(torch.argmin(d2))
        if float(d2[k]) < self.min_pair_distance * self.min_pair_distance:
            raise ValueError(
                "atoms " + str(int(i[k])) + " and " + str(int(j[k]))
                + " are at the same position (distance " + str(float(torch.sqrt(d2[k]))) + " Å)"
            )

    def atom_energies_from_pairs(
        self,
        positions: Tensor,
        numbers: Tensor,
        charge: Tensor,
        spin: Tensor,
        i: Tensor,
        j: Tensor,
        shift: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Per-atom energies from a pair list sorted by i.

        ``positions[j] - positions[i] + shift`` is each pair's displacement (Å); ``charge`` and
        ``spin`` are per atom. Differentiable with respect to positions and shift.
        """
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift)
        return self.network(numbers, charge, spin, nbr_index, nbr_vec)

    def _dense_neighbors(
        self, positions: Tensor, i: Tensor, j: Tensor, shift: Tensor, n_rows: int = -1
    ) -> Tuple[Tensor, Tensor]:
        """``nbr_index`` [R, K] (padding N) and displacements ``nbr_vec`` [R, K, 3] (padding
        beyond the cutoff) of a pair list sorted by i; differentiable in positions and shift.
        R = ``n_rows`` (the first atoms: an engine's local atoms), default all N atoms."""
        n_atoms = positions.shape[0]
        rows = n_atoms if n_rows < 0 else n_rows
        vec = positions.index_select(0, j) - positions.index_select(0, i) + shift
        if self.check_inputs:
            self._check_pair_distances(vec, i, j)
        row, slot, k_max = pairs_to_dense(i, rows)
        far = torch.zeros(3, dtype=positions.dtype, device=positions.device)
        far[0] = 2.0 * self.cutoff
        nbr_vec = far.expand(rows, k_max, 3).clone()
        nbr_vec = nbr_vec.index_put((row, slot), vec)
        nbr_index = torch.full((rows, k_max), n_atoms, dtype=torch.long, device=positions.device)
        nbr_index = nbr_index.index_put((row, slot), j)
        return nbr_index, nbr_vec

    def _system_energies(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        strain: Tensor,
    ) -> Tuple[Tensor, List[Tensor]]:
        """Per-atom energies of one system; ``strain`` (3x3, zeros) carries the virial."""
        i, j, s = neighbor_pairs(positions, cell, pbc, self.cutoff)
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        pos = positions @ deform
        shift = s @ (cell @ deform)
        n_atoms = positions.shape[0]
        q = charge.reshape(1).to(torch.long).expand(n_atoms)
        m = spin.reshape(1).to(torch.long).expand(n_atoms)
        return self.atom_energies_from_pairs(pos, numbers, q, m, i, j, shift)

    def _gradients_low_memory(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        strain: Tensor,
        inputs: List[Tensor],
    ) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """Per-atom energies and d(sum)/d(inputs) holding one layer's autograd graph at a time.

        A forward sweep keeps only each layer's output tokens [N, W]; the backward sweep re-runs
        one layer at a time with autograd and hands its input gradient to the layer below
        (activation checkpointing). Edge features are detached leaves in the sweeps; they are
        recomputed with their graph at the end, and their accumulated gradients go through the
        edge encoder and the neighbour geometry to ``inputs`` in one last call. Same values as the plain path; memory is one layer's
        activations instead of all of them, for one extra forward pass.
        """
        i, j, s = neighbor_pairs(positions, cell, pbc, self.cutoff)
        deform = torch.eye(3, dtype=positions.dtype, device=positions.device) + strain
        shift = s @ (cell @ deform)
        n_atoms = positions.shape[0]
        q = charge.reshape(1).to(torch.long).expand(n_atoms)
        m = spin.reshape(1).to(torch.long).expand(n_atoms)
        return self._checkpointed_gradients(positions @ deform, numbers, q, m, i, j, shift, inputs)

    def _checkpointed_gradients(
        self,
        positions: Tensor,
        numbers: Tensor,
        q: Tensor,
        m: Tensor,
        i: Tensor,
        j: Tensor,
        shift: Tensor,
        inputs: List[Tensor],
    ) -> Tuple[Tensor, List[Optional[Tensor]]]:
        """The checkpointed sweeps of :meth:`_gradients_low_memory` for a pair list sorted by i
        (``positions[j] - positions[i] + shift``; q, m per atom)."""
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift)
        net = self.network
        # Edge features without their graph during the sweeps (recomputed with it at the end).
        edge_fixed, env_fixed = net.edge_features(nbr_vec.detach())
        edge_fixed = edge_fixed.detach()
        env_fixed = env_fixed.detach()
        # Forward sweep: each layer's graph is dropped as soon as its output is detached.
        tokens: List[Tensor] = [net.embed(numbers, q, m).detach()]
        for layer in net.layers:
            tokens.append(layer(tokens[-1], nbr_index, edge_fixed, env_fixed).detach())
        last = tokens[-1].requires_grad_(True)
        energies = net.atom_energies(last, numbers)
        grad_h = torch.autograd.grad([energies.sum()], [last])[0]
        edge_leaf = edge_fixed.requires_grad_(True)
        env_leaf = env_fixed.requires_grad_(True)
        grad_edge = torch.zeros_like(edge_fixed)
        grad_env = torch.zeros_like(env_fixed)
        for index in range(self.num_layers - 1, -1, -1):
            h_in = tokens[index].requires_grad_(index > 0)
            out = net.run_layer(index, h_in, nbr_index, edge_leaf, env_leaf)
            wrt = [edge_leaf, env_leaf, h_in] if index > 0 else [edge_leaf, env_leaf]
            seed: List[Optional[Tensor]] = [grad_h]
            grads = torch.autograd.grad([out], wrt, seed, allow_unused=True)
            g_edge, g_env = grads[0], grads[1]
            if g_edge is not None:
                grad_edge = grad_edge + g_edge
            if g_env is not None:
                grad_env = grad_env + g_env
            if index > 0:
                g_h = grads[2]
                grad_h = g_h if g_h is not None else torch.zeros_like(h_in)
        edge, envelope = net.edge_features(nbr_vec)
        seeds: List[Optional[Tensor]] = [grad_edge, grad_env]
        result = torch.autograd.grad([edge, envelope], inputs, seeds, allow_unused=True)
        return energies.detach(), result

    # ------------------------------------------------------------------ Python / ASE entry
    @torch.jit.export
    def compute(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        compute_forces: bool = True,
        compute_stress: bool = False,
    ) -> Dict[str, Tensor]:
        """Energy (eV), per-atom energies, forces (eV/Å) and stress (eV/Å^3, 3x3) of one system.

        ``positions`` [N, 3] Å; ``numbers`` [N] int64; ``cell`` [3, 3] Å (rows are lattice
        vectors); ``pbc`` [3] bool; ``charge``, ``spin`` scalar tensors (total charge, spin
        multiplicity).
        """
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        dtype = positions.dtype
        if self.check_inputs:
            self._validate_system(positions, numbers, charge, spin)
        periodic = bool(pbc.any())
        positions = positions.detach().requires_grad_(compute_forces)
        strain = torch.zeros((3, 3), dtype=dtype, device=positions.device)
        want_stress = compute_stress and periodic
        strain.requires_grad_(want_stress)
        inputs: List[Tensor] = []
        if compute_forces:
            inputs.append(positions)
        if want_stress:
            inputs.append(strain)
        grads: List[Optional[Tensor]] = []
        if self.low_memory and len(inputs) > 0:
            energies, grads = self._gradients_low_memory(
                positions, numbers, cell, pbc, charge, spin, strain, inputs)
        else:
            energies, _ = self._system_energies(positions, numbers, cell, pbc, charge, spin, strain)
            if len(inputs) > 0:
                grads = torch.autograd.grad([energies.sum()], inputs, allow_unused=True)
        energy = energies.sum()
        out: Dict[str, Tensor] = {"energy": energy.detach(), "energies": energies.detach()}
        if len(inputs) > 0:
            k = 0
            if compute_forces:
                g = grads[k]
                out["forces"] = -g if g is not None else torch.zeros_like(positions)
                k += 1
            if want_stress:
                g = grads[k]
                volume = torch.abs(torch.linalg.det(cell))
                dedstrain = g if g is not None else torch.zeros_like(strain)
                out["stress"] = 0.5 * (dedstrain + dedstrain.T) / volume
        return out

    @torch.jit.export
    def energy(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Tensor:
        """Differentiable total energy (eV) of one system; for engines that run autograd."""
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        dtype = positions.dtype
        if self.check_inputs:
            self._validate_system(positions, numbers, charge, spin)
        strain = torch.zeros((3, 3), dtype=dtype, device=positions.device)
        energies, _ = self._system_energies(positions, numbers, cell, pbc, charge, spin, strain)
        return energies.sum()

    @torch.jit.export
    def energy_static(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
        capacity: int,
    ) -> Tensor:
        """Like :meth:`energy`, with static tensor shapes and no host synchronisation.

        For CUDA-graph capture (OpenMM-Torch ``useCUDAGraphs``): all-pairs minimum-image
        displacements, then the ``capacity`` nearest neighbours of each atom (``topk``), so
        every shape depends on N and ``capacity`` only. Neighbours beyond the cutoff get a zero
        envelope and contribute nothing. Requirements (not checked here, the caller checks):
        1 <= capacity <= N - 1, periodic cells at least 2 x cutoff wide, and at most
        ``capacity`` neighbours within the cutoff; if an atom has more, the energy is NaN
        (checked on the device, so a run stops instead of silently dropping neighbours).
        """
        positions, numbers, cell, pbc, charge, spin = self._prepare(
            positions, numbers, cell, pbc, charge, spin)
        n_atoms = positions.shape[0]
        pbc_f = pbc.to(positions.dtype)
        eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        # Open axes use the identity "cell" so that the inverse always exists.
        cell_eff = cell * pbc_f.unsqueeze(1) + eye * (1.0 - pbc_f).unsqueeze(1)
        # Select neighbours without autograd over the dense [N, N, 3] displacements, then
        # recompute only the selected ones differentiably: the backward pass then never touches
        # an N^2 tensor.
        # (detach(), not torch.no_grad(): under TorchScript the no_grad block gave wrong
        # gradients for the recomputed vectors below.)
        fixed = positions.detach()
        cell_fixed = cell_eff.detach()
        disp = fixed.unsqueeze(0) - fixed.unsqueeze(1)  # [i, j] = x_j - x_i
        # inv_ex, not inv: inv checks for singularity on the host (a device sync), which
        # breaks CUDA-graph capture; cell_eff is invertible by construction.
        frac = disp @ torch.linalg.inv_ex(cell_fixed)[0]
        image = torch.round(frac) * pbc_f  # lattice vectors to subtract (minimum image)
        disp = (frac - image) @ cell_fixed
        d2 = (disp * disp).sum(-1) + eye.new_full((n_atoms,), 1e30).diag()
        nearest, index = torch.topk(d2, capacity, dim=1, largest=False)
        nbr_image = image.gather(1, index.unsqueeze(-1).expand(n_atoms, capacity, 3))
        nbr_pos = positions.index_select(0, index.reshape(-1)).view(n_atoms, capacity, 3)
        nbr_vec = nbr_pos - positions.unsqueeze(1) - nbr_image @ cell_eff
        q = charge.reshape(1).to(torch.long).expand(n_atoms)
        m = spin.reshape(1).to(torch.long).expand(n_atoms)
        energies, _ = self.network(numbers, q, m, index, nbr_vec)
        energy = energies.sum()
        if capacity < n_atoms - 1:  # otherwise every atom is a neighbour: no overflow possible
            overflow = (nearest[:, capacity - 1] < self.cutoff * self.cutoff).any()
            energy = energy + torch.where(overflow, torch.full_like(energy, float("nan")),
                                          torch.zeros_like(energy))
        return energy

    # ------------------------------------------------------------------ LAMMPS entry
    def _prepare_engine(
        self, positions: Tensor, numbers: Tensor, charge: Tensor, spin: Tensor,
        fresh_leaf: bool = True,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """Inputs of the engine entry points on the model's device/dtype, validated, and
        positions as a fresh autograd leaf (``fresh_leaf``) or keeping the caller's graph."""
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        positions = positions.to(device=device, dtype=dtype)
        numbers = numbers.to(device=device, dtype=torch.long)
        charge = charge.to(device)
        spin = spin.to(device)
        if self.check_inputs:
            self.validate(positions, numbers, charge, spin)
        if fresh_leaf:
            positions = positions.detach().requires_grad_(True)
        return positions, numbers, charge, spin

    def _engine_pairs(
        self, positions: Tensor, edge_i: Tensor, edge_j: Tensor, edge_shift: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """The engine's pairs within the cutoff (its lists include the skin), sorted by i."""
        device = positions.device
        edge_i = edge_i.to(device)
        edge_j = edge_j.to(device)
        edge_shift = edge_shift.to(device=device, dtype=positions.dtype)
        with torch.no_grad():
            d = positions[edge_j] - positions[edge_i] + edge_shift
            keep = (d * d).sum(1) < self.cutoff * self.cutoff
            order = torch.argsort(edge_i[keep], stable=True)
            return edge_i[keep][order], edge_j[keep][order], edge_shift[keep][order]

    @torch.jit.export
    def lammps(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        nlocal: int,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor]:
        """Per-atom energies of the local atoms (eV) and forces on all atoms (eV/Å).

        ``positions`` [Ntot, 3] Å of local then ghost atoms (ghosts are periodic images or
        other ranks' atoms, already at their image positions); ``numbers`` [Ntot]; ``edge_i``,
        ``edge_j`` the engine's full neighbour pairs (both directions, any order, may include
        pairs beyond the cutoff, which are dropped). Only local energies are summed, so forces
        on ghosts must be added back to their owners by the engine (reverse communication).
        Exact when ghosts extend to the receptive field (layers x cutoff).
        """
        positions, numbers, charge, spin = self._prepare_engine(positions, numbers, charge, spin)
        zero_shift = torch.zeros((edge_i.shape[0], 3), dtype=positions.dtype, device=positions.device)
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, zero_shift)
        n_total = positions.shape[0]
        q = charge.reshape(1).to(torch.long).expand(n_total)
        m = spin.reshape(1).to(torch.long).expand(n_total)
        energies, _ = self.atom_energies_from_pairs(positions, numbers, q, m, i, j, shift)
        local = energies[:nlocal]
        grads = torch.autograd.grad([local.sum()], [positions], allow_unused=True)
        g = grads[0]
        forces = -g if g is not None else torch.zeros_like(positions)
        return local.detach(), forces

    @torch.jit.export
    def lammps_periodic(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        edge_shift: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Owner-mapped evaluation: energies [N] (eV), forces [N, 3] (eV/Å), virial [6] (eV).

        For an engine that holds every atom of a periodic system (LAMMPS on one rank): rows are
        the owned atoms only; each periodic-image neighbour is mapped back to the atom it images,
        with ``edge_shift`` [E, 3] (Å) = image position - owner position, so the displacement is
        ``positions[j] - positions[i] + edge_shift``. The model then runs on N atoms instead of
        the whole receptive-field ghost shell. The virial is -Σ_edges r ⊗ ∂E/∂r in LAMMPS order
        (xx, yy, zz, xy, xz, yz), equal to Σ x·f over atoms and images.
        """
        positions, numbers, charge, spin = self._prepare_engine(positions, numbers, charge, spin)
        dtype = positions.dtype
        device = positions.device
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, edge_shift)
        shift = shift.detach().requires_grad_(True)
        n_atoms = positions.shape[0]
        q = charge.reshape(1).to(torch.long).expand(n_atoms)
        m = spin.reshape(1).to(torch.long).expand(n_atoms)
        if self.low_memory:
            energies, grads = self._checkpointed_gradients(
                positions, numbers, q, m, i, j, shift, [positions, shift])
        else:
            energies, _ = self.atom_energies_from_pairs(positions, numbers, q, m, i, j, shift)
            grads = torch.autograd.grad([energies.sum()], [positions, shift], allow_unused=True)
        g_pos = grads[0]
        g_shift = grads[1]
        forces = -g_pos if g_pos is not None else torch.zeros_like(positions)
        virial = torch.zeros(6, dtype=dtype, device=device)
        if g_shift is not None:
            with torch.no_grad():
                vec = positions.detach()[j] - positions.detach()[i] + shift.detach()
                w = -(vec.unsqueeze(2) * g_shift.unsqueeze(1)).sum(0)
                virial = torch.stack([w[0, 0], w[1, 1], w[2, 2], w[0, 1], w[0, 2], w[1, 2]])
        return energies.detach(), forces, virial

    # ------------------------------------------------------------------ LAMMPS halo exchange
    # Format version 2: the network in pieces, so that an engine with domain decomposition can
    # exchange per-atom features of boundary atoms between layers (forward communication) and
    # send the gradients its ghost atoms received back to their owners (reverse communication).
    # The algorithm is in export/CONTRACT.md, section 3.6.
    @torch.jit.export
    def halo_feature_width(self) -> int:
        """W: the number of features per atom exchanged between layers."""
        return int(self.network.element_embedding.weight.shape[1])

    @torch.jit.export
    def halo_edges(
        self,
        positions: Tensor,
        numbers: Tensor,
        edge_i: Tensor,
        edge_j: Tensor,
        nlocal: int,
        charge: Tensor,
        spin: Tensor,
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Dense neighbour layout and edge features of the ``nlocal`` local atoms.

        ``positions`` [Ntot, 3] Å (local atoms first, then ghosts, at their image positions;
        differentiable: the engine passes a leaf and later back-propagates through ``edge`` and
        ``envelope`` to it); ``numbers`` [Ntot]; ``edge_i``, ``edge_j`` the engine's neighbour
        pairs. Pairs beyond the cutoff and pairs whose centre is not local are dropped.
        Returns ``nbr_index`` [nlocal, K] (rows of the feature matrix, padding = Ntot),
        ``edge`` [nlocal, K, E] and ``envelope`` [nlocal, K]. Validates the inputs like the
        other entry points (element, charge, spin, atoms at the same position).
        """
        n_total = positions.shape[0]
        if nlocal < 0 or nlocal > n_total:
            raise ValueError(
                "nlocal = " + str(nlocal) + " is outside 0.." + str(n_total) + " (atoms given)"
            )
        # The engine back-propagates to its own positions leaf: keep the graph.
        positions, numbers, charge, spin = self._prepare_engine(
            positions, numbers, charge, spin, False)
        edge_i = edge_i.to(positions.device)
        edge_j = edge_j.to(positions.device)
        local = edge_i < nlocal
        edge_i = edge_i[local]
        edge_j = edge_j[local]
        zero_shift = torch.zeros((edge_i.shape[0], 3), dtype=positions.dtype,
                                 device=positions.device)
        i, j, shift = self._engine_pairs(positions, edge_i, edge_j, zero_shift)
        nbr_index, nbr_vec = self._dense_neighbors(positions, i, j, shift, nlocal)
        edge, envelope = self.network.edge_features(nbr_vec)
        return nbr_index, edge, envelope

    @torch.jit.export
    def halo_embed(self, numbers: Tensor, charge: Tensor, spin: Tensor) -> Tensor:
        """Input features h0 [Ntot, W] of local and ghost atoms (no geometry: no exchange)."""
        device = self.network.energy_scale.device
        numbers = numbers.to(device=device, dtype=torch.long)
        n_total = numbers.shape[0]
        q = charge.to(device).reshape(1).to(torch.long).expand(n_total)
        m = spin.to(device).reshape(1).to(torch.long).expand(n_total)
        return self.network.embed(numbers, q, m)

    @torch.jit.export
    def halo_layer(
        self, layer: int, h: Tensor, nbr_index: Tensor, edge: Tensor, envelope: Tensor
    ) -> Tensor:
        """Attention layer ``layer`` (0-based) on the local atoms: new features [nlocal, W] from
        ``h`` [Ntot, W] of local and ghost atoms (ghost rows as their owners computed them)."""
        if layer < 0 or layer >= self.num_layers:
            raise ValueError(
                "layer " + str(layer) + " does not exist (the model has " + str(self.num_layers)
                + " layers)"
            )
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        h = h.to(device=device, dtype=dtype)
        nbr_index = nbr_index.to(device)
        return self.network.run_layer(layer, h, nbr_index, edge, envelope)

    @torch.jit.export
    def halo_readout(self, h: Tensor, numbers: Tensor) -> Tensor:
        """Per-atom energies [nlocal] (eV) from the last layer's features of the local atoms."""
        dtype = self.network.energy_scale.dtype
        device = self.network.energy_scale.device
        h = h.to(device=device, dtype=dtype)
        numbers = numbers.to(device=device, dtype=torch.long)
        return self.network.atom_energies(h, numbers)

    def forward(
        self,
        positions: Tensor,
        numbers: Tensor,
        cell: Tensor,
        pbc: Tensor,
        charge: Tensor,
        spin: Tensor,
    ) -> Dict[str, Tensor]:
        return self.compute(positions, numbers, cell, pbc, charge, spin, True, True)
