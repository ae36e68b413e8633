from setuptools import find_packages, setup

setup(
    name="nnunet-lefusion",
    version="0.1.0",
    description="LeFusion lesion synthesis as a data-augmentation plugin for nnU-Net v2",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nnunet_lefusion", "nnunet_lefusion.*"]),
    package_data={"nnunet_lefusion": ["model/configs/*.yaml"]},
    install_requires=[
        "nnunetv2>=2.8,<2.9",
        "torch>=2.1",
        "batchgeneratorsv2",
        "SimpleITK",
        "numpy",
        "pyyaml",
        "tqdm",
        "scipy",
        "scikit-learn",
        "blosc2",
        "matplotlib",
    ],
    extras_require={"test": ["pytest", "pytest-xdist"]},
    entry_points={
        "console_scripts": [
            "nnUNetv2_lefusion_phantom=nnunet_lefusion.cli.phantom:main",
            "nnUNetv2_lefusion_convert_emidec=nnunet_lefusion.cli.convert_emidec:main",
            "nnUNetv2_lefusion_register=nnunet_lefusion.cli.register:main",
            "nnUNetv2_lefusion_synthesize=nnunet_lefusion.cli.synthesize:main",
            "nnUNetv2_lefusion_train_sampler=nnunet_lefusion.cli.train_sampler:main",
            "nnUNetv2_lefusion_sample=nnunet_lefusion.cli.sample:main",
            "nnUNetv2_lefusion_train_masks=nnunet_lefusion.cli.train_masks:main",
            "nnUNetv2_lefusion_export=nnunet_lefusion.cli.export:main",
            "nnUNetv2_lefusion_demo=nnunet_lefusion.cli.demo:main",
            "nnUNetv2_lefusion_benchmark=nnunet_lefusion.cli.benchmark:main",
        ]
    },
)
