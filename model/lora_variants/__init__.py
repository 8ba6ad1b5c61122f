"""The LoRA family: variants of the plain LoRA in model/model_lora.py, one short module each.

Importing this package registers every variant (``registry.py`` says what a ``Variant`` is made of) with
``model/model_lora.py::VARIANTS``, where ``apply_lora``, ``save_lora`` and ``load_lora`` find them; a
program that trains or loads a variant's adapter imports it once. The modules are imported in the order
``--lora_variant`` lists them: first how the adapter is built or initialised, then how it is optimised,
then what training does beside it.
"""
from model.lora_variants.registry import (TrainSetup, Variant, add_variant_args, adapter_layers,  # noqa: F401
                                          config_from_args, get_variant, register, variants)
from model.lora_variants import dora, vera, pissa, olora, lora_ga, qlora, adalora  # noqa: F401
from model.lora_variants import lora_fa, lora_plus, lora_pro                       # noqa: F401
from model.lora_variants import delta_lora, lora_drop                               # noqa: F401
