"""Students that timm lacks, registered in timm's model registry on import.

Importing this package is enough for ``timm.create_model(NAME)`` and ``main.py --model NAME`` to
find them. The standard DeiT family (``deit_*_patch16_224`` ...) is timm's own implementation,
whose state-dict keys are exactly the official DeiT checkpoint keys.
"""
from . import convit, deit, deit3, mobile_former, regnet  # noqa: F401  (registers the models)
