"""Packaging for msn-fast.

The user's design card puts the kernels and the data loading in top-level folders; `package_dir`
maps them into the one `msn_fast` namespace (`msn_fast.kernels` -> `kernels/`,
`msn_fast.dataloading` -> `dataloading/`) so nothing generic lands in site-packages.
"""

import platform

from setuptools import setup

IS_LINUX_X86 = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

install_requires = [
    "torch>=2.4",
    "torchvision>=0.19",
    "numpy",
    "pillow",
    # scikit-learn: the low-shot logistic regression, and the embedded default dataset
    # (its bundled handwritten digits), so `python -m msn_fast.train` runs with no download.
    "scikit-learn>=1.3",
    "tqdm>=4.62",  # progress bars of feature extraction and evaluation (plain log lines off a terminal)
    'triton>=3.0; platform_system == "Linux"',
]

extras_require = {
    "dali": ['nvidia-dali-cuda120>=1.40; platform_system == "Linux" and platform_machine == "x86_64"'],
    "xformers": ["xformers"],
    "apex": ["apex"],
    "timm": ["timm>=1.0"],
    "hf": ["transformers>=4.44"],  # msn_fast.interop.to_hf / from_hf / export-hf (tested with 4.46.3, 5.24, 5.25)
    "shards": ["webdataset>=0.2.86"],  # --data.path 'shards-{000000..000127}.tar', msn_fast.dataloading.shards
    "tensorboard": ["tensorboard"],
    "bench": ["pytest>=8", "pytest-benchmark>=4", "matplotlib"],
    # dev: what the test suite needs (timm and transformers for the interop tests, matplotlib for the plots,
    # webdataset for the shard tests);
    # `dali` adds the DALI loader's tests.
    "dev": ["pytest>=8", "pytest-benchmark>=4", "timm>=1.0", "transformers>=4.44", "matplotlib", "webdataset>=0.2.86",
            "ruff"],
}

setup(
    name="msn-fast",
    version="0.1.0",
    description="Masked Siamese Networks (Assran et al. 2022), performance-engineered: ViT token dropping, "
    "Triton kernels, multi-view data loading, low-shot evaluation.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["msn_fast", "msn_fast.kernels", "msn_fast.dataloading"],
    package_dir={"msn_fast": "msn_fast", "msn_fast.kernels": "kernels", "msn_fast.dataloading": "dataloading"},
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points={"console_scripts": ["msn-train=msn_fast.train:main", "msn-fast-check=msn_fast.check:main"]},
    license="Apache-2.0",
)
