#!/usr/bin/env bash
# Regenerates the committed seed corpus (tests/fuzz/corpus/<target>/) from the golden fixtures, the
# presets and epic's own writers. Usage: tests/fuzz/make_corpus.sh BUILD_DIR (a build folder with the
# make_seed_messages target built). Keep the corpus small (under ~2 MB): seeds, not a fuzzing archive.
set -euo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$fuzz_dir/../.." && pwd)"
build_dir="${1:?usage: make_corpus.sh BUILD_DIR}"
corpus="$fuzz_dir/corpus"
fixtures="$repo_root/tests/golden/fixtures"
rm -rf "$corpus"
mkdir -p "$corpus"/{safetensors_header,model_config,checkpoint_index,tokenizer}

for config in "$fixtures"/*/config.json; do
  cp "$config" "$corpus/model_config/$(basename "$(dirname "$config")").json"
done
for preset in "$repo_root"/configs/presets/*.json; do cp "$preset" "$corpus/model_config/preset_$(basename "$preset")"; done

python3 - "$fixtures" "$corpus" <<'PY'
# safetensors seeds: each fixture's first shard cut to its header (the length field still names the
# whole header, the data is gone), and a small complete file per fixture built from real tensors
# (their header entries and bytes, offsets re-laid end to end). Index seeds: each index, whole and
# cut to its first tensors.
import json, pathlib, struct, sys
fixtures, corpus = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for fixture in sorted(p for p in fixtures.iterdir() if p.is_dir()):
    shards = sorted(fixture.glob("*.safetensors"))
    raw = shards[0].read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    (corpus / "safetensors_header" / f"{fixture.name}_header_only.safetensors").write_bytes(raw[: 8 + header_length])
    header = json.loads(raw[8 : 8 + header_length])
    data = raw[8 + header_length :]
    small, blob = {}, b""
    for name, entry in sorted(header.items()):
        if name == "__metadata__":
            small[name] = entry
            continue
        begin, end = entry["data_offsets"]
        if len(blob) + end - begin > 3000:
            continue
        small[name] = dict(entry, data_offsets=[len(blob), len(blob) + end - begin])
        blob += data[begin:end]
    text = json.dumps(small, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    (corpus / "safetensors_header" / f"{fixture.name}_small.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + blob)
    index = fixture / "model.safetensors.index.json"
    if index.exists():
        (corpus / "checkpoint_index" / f"{fixture.name}.json").write_bytes(index.read_bytes())
        document = json.loads(index.read_text())
        first = dict(sorted(document["weight_map"].items())[:6])
        (corpus / "checkpoint_index" / f"{fixture.name}_first6.json").write_text(json.dumps(dict(document, weight_map=first), indent=2))

# tokenizer seeds: byte 0 even = encode the text that follows; odd = decode the int32 ids that follow.
texts = ["Hello world<|im_end|>", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
         "混合专家模型 (MoE) を使う。", "  tabs\tand\n\nnewlines   ", "e\u0301 \u00e9 \ufb01 \U0001F600 don't I'm 12345",
         "def f(x):\n    return x ** 2  # comment"]
for number, text in enumerate(texts):
    (corpus / "tokenizer" / f"encode_{number}.bin").write_bytes(b"\x00" + text.encode())
for number, ids in enumerate([[9707, 1879, 151645], [151644, 872, 198, 151645], [0, 1, 2, 255, 256], [151643, 151669]]):
    (corpus / "tokenizer" / f"decode_{number}.bin").write_bytes(b"\x01" + struct.pack(f"<{len(ids)}i", *ids))
PY

"$build_dir/tests/fuzz/make_seed_messages" "$corpus"
du -sh "$corpus"
for target in "$corpus"/*; do echo "$(basename "$target"): $(ls "$target" | wc -l) seeds"; done
