#!/bin/bash
# GPU smoke test of pair_style transip (device cuda) with the carried LAMMPS/mpich bundle.
G=$PWD/build/gpu
mkdir -p /tmp/lmp && tar xJf $G/bundle.tar.xz -C /tmp/lmp
nvidia-smi --query-gpu=name,driver_version --format=csv
which g++ python3; g++ --version | head -1
TD=$(python3 -c "import torch,os;print(os.path.dirname(torch.__file__))")
ABI=$(python3 -c "import torch;print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
python3 -c "import torch;print(torch.__version__, torch.cuda.is_available())"
SRC=$PWD/lammps_examples/plugin
FLAGS=(-std=c++17 -O2 -fPIC -Wall -DLAMMPS_SMALLBIG -D_GLIBCXX_USE_CXX11_ABI=$ABI "-DTRANSIP_LAMMPS_VERSION=\"22 Jul 2025\"" -isystem $TD/include -isystem $TD/include/torch/csrc/api/include -isystem /tmp/lmp/lammps/include/lammps -isystem /tmp/lmp/include)
time (g++ "${FLAGS[@]}" -c $SRC/pair_transip.cpp -o /tmp/p.o & g++ "${FLAGS[@]}" -c $SRC/transip_plugin.cpp -o /tmp/q.o & wait)
g++ -shared -o /tmp/transipplugin.so /tmp/p.o /tmp/q.o -L$TD/lib -Wl,-rpath,$TD/lib -Wl,--no-as-needed -ltorch -ltorch_cpu -lc10 -Wl,--as-needed || exit 1
export LD_LIBRARY_PATH=/tmp/lmp/lib:$LD_LIBRARY_PATH OMP_NUM_THREADS=1
LMP=/tmp/lmp/lammps/lmp
cd /tmp
deck() { # data model style dumpfile steps
cat <<EOD
units metal
atom_style atomic
read_data $1
plugin load /tmp/transipplugin.so
pair_style transip $3
pair_coeff * * $2 O H
compute vir all pressure NULL virial
thermo_style custom step pe c_vir[*]
thermo_modify format float %.15g
dump d all custom 1 $4 id fx fy fz
dump_modify d sort id format float %.17g
run 0
undump d
velocity all create 300 1 mom yes rot yes
fix 1 all nve
timestep 0.0005
thermo 50
run $5
EOD
}
deck $G/water64.data $G/model64.pt "device cpu" cpu64.dump 0 > in.a; $LMP -in in.a -log none | grep -E "TransIP|^ +0 |ERROR"
deck $G/water64.data $G/model64.pt "device cuda" cuda64.dump 0 > in.b; $LMP -in in.b -log none | grep -E "TransIP|^ +0 |ERROR|device"
/tmp/lmp/bin/mpirun -np 2 $LMP -in in.b -var x 1 -log none | grep -E "^ +0 |ERROR"; cp cuda64.dump cuda64np2.dump
deck $G/water64.data $G/model32.pt "device cuda" cuda32.dump 0 > in.c; $LMP -in in.c -log none | grep -E "^ +0 |ERROR"
deck $G/water64.data $G/model32.pt "device cpu" cpu32.dump 0 > in.d; $LMP -in in.d -log none | grep -E "^ +0 |ERROR"
python3 - <<'PY'
import numpy as np
def rd(p):
    L=open(p).read().splitlines(); i=max(k for k,l in enumerate(L) if l.startswith('ITEM: ATOMS'))
    return np.array([[float(v) for v in l.split()] for l in L[i+1:]])
a,b,c=rd('cpu64.dump'),rd('cuda64.dump'),rd('cuda64np2.dump')
print('f64 cuda vs cpu max|dF|', np.abs(a[:,1:]-b[:,1:]).max(), 'scale', np.abs(a[:,1:]).max())
print('f64 cuda np2 vs cpu max|dF|', np.abs(a[:,1:]-c[:,1:]).max())
d,e=rd('cpu32.dump'),rd('cuda32.dump')
print('f32 cuda vs cpu max|dF|', np.abs(d[:,1:]-e[:,1:]).max(), 'vs f64', np.abs(d[:,1:]-a[:,1:]).max())
PY
# speed: 12288 atoms, float32
for opt in yes no; do
deck $G/water4k.data $G/demo32.pt "device cuda jit_optimize $opt" big.dump 100 > in.e; $LMP -in in.e -log none | grep -E "TransIP: model input|Loop time|^ +100 |ERROR"
done
deck $G/water4k.data $G/demo64.pt "device cuda" big.dump 50 > in.f; $LMP -in in.f -log none | grep -E "Loop time|ERROR"
OMP_NUM_THREADS=16 ; deck $G/water4k.data $G/demo32.pt "device cpu" big.dump 5 > in.g; OMP_NUM_THREADS=16 $LMP -in in.g -log none | grep -E "Loop time|ERROR"
