"""Build of boxloss and its compiled ops, boxloss._C.

Switches (environment variables):
  BOXLOSS_NO_CUDA=1      build the CPU kernels only, even where CUDA is available.
  FORCE_CUDA=1           build the CUDA kernels even without a visible GPU; a missing
                         toolkit or a CPU-only torch is then an error.  BOXLOSS_FORCE_CUDA
                         is the same switch under the project's own name.
  TORCH_CUDA_ARCH_LIST   CUDA architectures, default "8.0;9.0+PTX" (A100, H100, and PTX
                         that later GPUs JIT-compile).
  NVCC_FLAGS             extra flags for nvcc, split like a shell line.
  CXXFLAGS               honoured by the compiler as usual.
  BOXLOSS_DEBUG=1        -O0 -g builds.
  MAX_JOBS               parallel compile jobs (ninja), as in torch.utils.cpp_extension.

Build with the installed torch:  pip install --no-build-isolation [-e] .
"""

import glob
import os
import shlex
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# The pinned tools of `pip install -e ".[dev]"`; .ci/run installs the same list.
DEV_REQUIRES = ["ruff==0.17.6"]


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def guess_cuda_home():
    """torch finds CUDA through CUDA_HOME or the nvcc on PATH; an nvcc wrapper script
    in /usr/local/bin would make it guess /usr/local, so look for the real toolkit."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    for candidate in ("/usr/local/cuda",):
        if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


cuda_home = guess_cuda_home()
if cuda_home:
    os.environ.setdefault("CUDA_HOME", cuda_home)

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - the message is the point
    sys.exit(
        "boxloss builds against the installed torch, and torch could not be imported "
        f"({exc}).\nInstall torch first, then build without isolation:\n"
        "    pip install torch && pip install --no-build-isolation ."
    )


def want_cuda():
    if env_flag("BOXLOSS_NO_CUDA"):
        return False
    forced = env_flag("FORCE_CUDA") or env_flag("BOXLOSS_FORCE_CUDA")
    have_toolkit = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    torch_has_cuda = torch.version.cuda is not None
    if forced:
        if not torch_has_cuda:
            sys.exit(f"FORCE_CUDA=1 but the installed torch {torch.__version__} is a CPU-only build.")
        if not have_toolkit:
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME.")
        return True
    return torch_has_cuda and have_toolkit


def nvidia_wheel_include_dirs():
    """Headers of the CUDA math libraries that torch's CUDA headers include
    (cusparse.h, cublas_v2.h, ...).  Toolkits without them can use the copies
    that torch's own nvidia-* wheels install under site-packages/nvidia."""
    dirs = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def write_build_info(with_cuda, arch_list):
    path = os.path.join(ROOT, "boxloss", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time; not tracked by git.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCH_LIST = {arch_list!r}\n")


def extensions():
    with_cuda = want_cuda()
    debug = env_flag("BOXLOSS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    sources = sorted(glob.glob(os.path.join("csrc", "ops", "**", "*.cpp"), recursive=True))
    sources += sorted(glob.glob(os.path.join("csrc", "kernels", "**", "*.cpp"), recursive=True))
    # -fno-trapping-math lets the compiler if-convert and vectorise the
    # branch-free exp and clamps of the CPU kernels; no kernel reads FP flags.
    # -fno-math-errno lets it vectorise sqrt (Box-Muller); no kernel reads errno.
    cxx_flags = opt + ["-fno-trapping-math", "-fno-math-errno", "-fvisibility=hidden"]
    link_flags = []
    # at::parallel_for is a header template: it only runs in parallel when the
    # extension itself is compiled with the OpenMP that torch's ATen uses.  The
    # libgomp this links is the one torch has already loaded (same soname).
    if "OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = []
    arch_list = None
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        sources += sorted(glob.glob(os.path.join("csrc", "kernels", "**", "*.cu"), recursive=True))
        include_dirs += nvidia_wheel_include_dirs()
        nvcc_flags = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        nvcc_flags += shlex.split(os.environ.get("NVCC_FLAGS", ""))
        define_macros.append(("BOXLOSS_WITH_CUDA", "1"))
        ext = CUDAExtension(
            "boxloss._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        sources = [s for s in sources if not s.endswith("_cuda.cpp")]
        ext = CppExtension(
            "boxloss._C",
            sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    write_build_info(with_cuda, arch_list)
    print(
        f"boxloss: building {'CPU and CUDA' if with_cuda else 'CPU'} kernels"
        + (f" for TORCH_CUDA_ARCH_LIST={arch_list}" if with_cuda else "")
    )
    return [ext]


class BuildExtensionKeepingObjects(BuildExtension):
    """Compiles into build/temp.<platform>-<python> in the checkout, whichever command builds.

    pip's editable install (setuptools' editable_wheel) would compile in a new
    temporary directory each time, so that every ``pip install -e`` compiled
    every source again.  In one kept directory ninja finds the objects of the
    last build and recompiles only what a changed source, header or flag
    affects; the link still runs.  ``--build-temp`` overrides the directory.
    """

    def initialize_options(self):
        super().initialize_options()
        self.build_temp = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


setup(
    name="boxloss",
    version="0.1.0",
    description="Fused CPU/CUDA losses for box-supervised semantic segmentation, as PyTorch ops",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    python_requires=">=3.9",
    packages=find_packages(include=["boxloss", "boxloss.*"]),
    install_requires=[
        "torch>=2.5",
        "torchvision",
        "numpy",
        "scipy",
        "pillow",
        "pycocotools",
        "opencv-python-headless",
        "pydensecrf2",
        "matplotlib",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "hypothesis", "expecttest", "scipy"], "dev": DEV_REQUIRES},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionKeepingObjects.with_options(use_ninja=True)},
    zip_safe=False,
)
