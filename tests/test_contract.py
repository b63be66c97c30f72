"""The exported file against export/CONTRACT.md: the declaration is complete and true.

Fails when the file offers an entry point the contract does not list, lacks one it lists,
declares a version the contract does not state, or declares something the scripted module does
not actually have; and checks that the Python door acts on the declaration.
"""

import re
import warnings
from pathlib import Path

import pytest
import torch

from conftest import make_potential
from transip_md.export import FORMAT_VERSION, ModelFileError, export_potential, load_exported, read_metadata
from transip_md.export.model_file import check_declaration, declared_capabilities
from transip_md.model import TransIPPotential
from transip_md.model.contract import FORMAT2_ALIASES, declared_entry_points

CONTRACT = Path(__file__).resolve().parents[1] / "export" / "CONTRACT.md"


def contract_table():
    text = CONTRACT.read_text()
    block = text.split("<!-- entry-points:begin -->")[1].split("<!-- entry-points:end -->")[0]
    rows = {}
    for line in block.splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|\s*(\d+)\s*\|", line)
        if m:
            rows[m.group(1)] = int(m.group(2))
    return rows


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("contract") / "m.pt"
    export_potential(make_potential(), path, dtype="float64")
    return path


def test_contract_lists_exactly_the_declared_entry_points(exported):
    documented = contract_table()
    assert documented, "CONTRACT.md has no entry-point table"
    declared = load_exported(exported).capabilities
    assert dict(declared) == documented
    assert read_metadata(exported)["capabilities"] == documented


def test_declared_entry_points_exist_in_the_scripted_file(exported):
    module = load_exported(exported)
    for name in module.capabilities:
        assert hasattr(module, name), f"declared {name} is not in the file"
    # and every marked method of the class is declared (nothing undeclared slips in)
    assert set(declared_entry_points(TransIPPotential)) == set(module.capabilities)


def test_declaration_values_match_the_model(exported):
    module = load_exported(exported)
    potential = make_potential()
    assert module.format_version == FORMAT_VERSION == 3
    assert module.limits["cutoff"] == potential.cutoff
    assert module.limits["receptive_field"] == potential.receptive_field
    assert module.limits["max_images"] == 64
    assert dict(module.species) == {"H": 1, "C": 6, "N": 7, "O": 8}
    assert module.operator_library == ""
    from transip_md import units
    assert module.unit_factors["kj_per_mol_per_ev"] == units.KJ_PER_MOL_PER_EV
    assert module.unit_factors["kcal_per_mol_per_ev"] == units.KCAL_PER_MOL_PER_EV


def test_format2_names_count_as_the_new_ones():
    old = {"format_version": 2, "entry_points": ["compute", "energy", "lammps", "lammps_periodic"]}
    caps = declared_capabilities(old)
    for new in FORMAT2_ALIASES.values():
        assert new in caps


def test_missing_capability_is_refused_with_what_to_do(exported):
    meta = dict(read_metadata(exported))
    meta["capabilities"] = {k: v for k, v in meta["capabilities"].items() if k != "energy"}
    with pytest.raises(ModelFileError, match=r"does not provide energy \(needed by OpenMM.*re-export"):
        check_declaration(meta, exported, needs=("energy",), who="OpenMM")


def test_missing_operator_library_is_refused(exported):
    # a name no loader knows (transip_ops itself is loaded by the door when a file needs it)
    meta = dict(read_metadata(exported), operator_library="transip_fast_ops")
    with pytest.raises(ModelFileError, match=r"needs the operator library 'transip_fast_ops'"):
        check_declaration(meta, exported)


def test_other_torch_major_version_warns(exported):
    meta = dict(read_metadata(exported), torch_version="1.13.1")
    with pytest.warns(UserWarning, match=r"exported with torch 1\.13\.1"):
        check_declaration(meta, exported)
    meta["torch_version"] = torch.__version__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_declaration(meta, exported)
