"""ssd-megatron: Megatron-style pretraining with Switchable Sparse-Dense Learning (SSD)."""
from setuptools import find_packages, setup

setup(
    name="ssd-megatron",
    version="0.1.0",
    description="Megatron-style distributed pretraining with Switchable Sparse-Dense Learning (SSD)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ssd_megatron", "ssd_megatron.*"]),
    package_data={"ssd_megatron": ["py.typed"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-xdist", "transformers>=4.40", "scikit-learn", "scipy", "faiss-cpu",
                "triton>=3.6,<3.10"],  # tests/backends/test_sm90_compile.py drives Triton's JIT internals
        "faiss": ["faiss-cpu"],
        "wandb": ["wandb"],
        "triton": ["triton"],
        # Built from sdist on a CUDA machine: see tools/build_megablocks.sh.
        "megablocks": ["megablocks==0.10.0", "grouped_gemm==0.3.0", "stanford-stk"],
    },
    entry_points={
        "console_scripts": [
            "ssd-train=ssd_megatron.cli:train_main",
            "ssd-eval=ssd_megatron.cli:eval_main",
            "ssd-data=ssd_megatron.cli:data_main",
            "ssd-bench=ssd_megatron.cli:bench_main",
            "ssd-report=ssd_megatron.cli:report_main",
        ]
    },
)
