/* -*- c++ -*- ----------------------------------------------------------
   pair_style transip: wall-clock time of the phases of compute(), summed over
   the timesteps of a run and reported by PairTransIP::finish()
   (pair_transip_timing.cpp) beside LAMMPS' own timing table.

   compute() starts the clock (start) and closes each phase (lap); the time
   between two marks goes to the phase named at the second. The force call of
   a run's setup is not counted (LAMMPS' Pair time leaves it out too): it
   starts the account anew (restart), so the report covers the steps of the
   run that just ended.

   On a GPU the model call returns when its last kernel is queued (or at its
   last host synchronisation), not when the device has finished: the device's
   work shows up in 'model' plus 'to host', whose copy of the results waits for
   it. 'to device' is what the host spends handing the inputs over.
------------------------------------------------------------------------- */

#ifndef LMP_PAIR_TRANSIP_TIMING_H
#define LMP_PAIR_TRANSIP_TIMING_H

#include <chrono>

namespace transip {

struct PhaseTimes {
  enum Phase { ROWS, TO_DEVICE, MODEL, HALO, TO_HOST, SCATTER, NPHASES };
  static constexpr const char *NAMES[NPHASES] = {"rows",    "to device", "model",
                                                 "halo",    "to host",   "scatter"};

  double seconds[NPHASES] = {};    // summed over the counted compute() calls
  long long steps = 0;             // counted compute() calls

  void restart() { *this = PhaseTimes(); }
  void start() { mark = std::chrono::steady_clock::now(); }
  void lap(Phase phase)
  {
    const auto now = std::chrono::steady_clock::now();
    seconds[phase] += std::chrono::duration<double>(now - mark).count();
    mark = now;
  }

 private:
  std::chrono::steady_clock::time_point mark;
};

}    // namespace transip

#endif
