from setuptools import find_packages, setup

setup(
    name="fairseq_memtrm",
    version="0.1.0",
    description="Memorizing Transformers (kNN-augmented attention with a per-document "
    "long-term memory) as a fairseq --user-dir plugin",
    packages=find_packages(include=["fairseq_memtrm", "fairseq_memtrm.*", "demo"]),
    python_requires=">=3.10",
)
