# Sourced by the GPU scripts: $model = out/models/qwen3-moe-python-small, the committed trained checkpoint
# (links) beside the Qwen3 tokenizer.json carried in .device (the GPU machine has no .deps).
model=$PWD/out/models/qwen3-moe-python-small
mkdir -p "$model"
for f in configs/models/qwen3-moe-python-small/*; do ln -sf "$PWD/$f" "$model/"; done
ln -sf "$PWD/.device/tokenizer.json" "$model/tokenizer.json"
