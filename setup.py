"""hvdllm: a Horovod-integrated plugin for training language models (PyTorch and TensorFlow/Keras 3).

The frameworks and Horovod are installed by ``launch/install.sh`` (Horovod 0.28.1 needs patches to
build against torch 2.13 and TF 2.21); the extras below name them for users who manage their own.
"""
from setuptools import find_packages, setup

setup(
    name="hvdllm",
    version="0.1.0",
    description="Horovod-integrated training of large language models: data, tensor and pipeline parallelism",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["hvdllm", "hvdllm.*"]),
    install_requires=["numpy>=1.26"],
    extras_require={
        "torch": ["torch==2.13.0"],
        "tensorflow": ["tensorflow-cpu==2.21.0"],
        "horovod": ["horovod==0.28.1"],
        "mpi": ["mpi4py>=4.0"],
        "train": ["tqdm", "safetensors", "tokenizers", "matplotlib", "pyyaml"],
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["hvdllm=hvdllm.cli:main"]},
)
