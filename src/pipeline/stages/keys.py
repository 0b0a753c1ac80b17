"""Config keys shared by the stage definitions (src/pipeline/stages/__init__.py and each method's
module): what a stage's output depends on besides its inputs, whose digests chain in.

Exact: a key listed for a stage redoes it, a key missing from every list never does
(tests/pipeline/test_hashes.py checks every leaf of the config against its own table). `data:` /
`file:` keys stand for the content of a split / file (src/pipeline/hashing.py).

The recipe, not the machine: precision is a setting of the method (bf16 vs fp32); the device kind
and count, nodes, strategy, loader workers and determinism flags are not hashed, so a run moved to
other hardware continues where it stopped (its numbers then agree up to float rounding, not bit
for bit; README "Resume and invalidation").
"""

TORCH = ("trainer.precision",)
# The training images as every stage that reads them sees them.
TRAIN_IMAGES = ("data:train_split", "data.format", "data.on_empty_label", "data.num_classes")
NORMALISED = ("data.mean", "data.std")
CAM_NET = ("backbone", "file:backbone.weights_path")
# Classifier settings that only exist from round 1 on (round 0 is the plain baseline).
CONTA_CLASSIFIER = (
    "conta.context",
    "conta.temperature",
    "conta.proj_dim",
    "conta.inject_at",
    "conta.post_concat_conv",
    "conta.init",
    "conta.ablate",
    "conta.attention",
)
