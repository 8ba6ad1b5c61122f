"""The library layer shared by the commands in scripts/ and dev/: what more than one command needs
(training recipes, scoring, measuring, rendering generated blocks into the docs) lives here, so that no
script imports another. It sits above the trainer in the import order: model -> LoRA -> dataset ->
trainer -> tools -> scripts/, dev/, eval_llm.py.
"""
