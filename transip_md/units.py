"""The one place where units are converted.

Every number here comes from ``ase.units`` (CODATA 2014 values as ASE ships them). The model
works in eV and Å; engines convert on the way in and out with these factors only.
"""

from ase import units as _ase_units

#: 1 nm expressed in Å.
ANGSTROM_PER_NM = float(_ase_units.nm / _ase_units.Angstrom)
#: 1 eV expressed in kJ/mol.
KJ_PER_MOL_PER_EV = float(_ase_units.eV / (_ase_units.kJ / _ase_units.mol))
#: 1 kcal/mol expressed in eV (LAMMPS ``units real``).
EV_PER_KCAL_PER_MOL = float((_ase_units.kcal / _ase_units.mol) / _ase_units.eV)
#: 1 eV expressed in kcal/mol (LAMMPS ``units real`` energies; the plugin reads it from the file).
KCAL_PER_MOL_PER_EV = 1.0 / EV_PER_KCAL_PER_MOL
#: meV in 1 eV.
MEV_PER_EV = 1000.0
#: 1 nm/ps (OpenMM's velocity unit) in ASE's velocity unit, Å per ASE time unit.
ASE_VELOCITY_PER_NM_PER_PS = ANGSTROM_PER_NM / (1000.0 * float(_ase_units.fs))
