// OpenAI's own npm client (openai 4) against a running epic serve: a completion, a streamed completion and a
// streamed chat, each checked against the text the caller expects (epic run's greedy text for the prompt).
//   node tests/serve/openai_client_check.cjs NPM_DIR BASE_URL MODEL PROMPT EXPECTED_TEXT
const path = require('path');
const [npmDir, baseURL, model, prompt, expected] = process.argv.slice(2);
const OpenAI = require(path.join(npmDir, 'node_modules', 'openai'));

let failures = 0;
function check(ok, what) {
  console.log((ok ? 'ok   ' : 'FAIL ') + what);
  if (!ok) failures += 1;
}

(async () => {
  const client = new OpenAI({ baseURL: baseURL + '/v1', apiKey: 'unused', maxRetries: 0 });
  const whole = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0 });
  check(whole.choices[0].text === expected, 'openai client: completions.create gives epic run\'s text');
  check(whole.usage.completion_tokens > 0, 'openai client: usage counts');

  const stream = await client.completions.create({ model, prompt, max_tokens: 24, temperature: 0, stream: true });
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    text += chunk.choices[0]?.text ?? '';
    finish = chunk.choices[0]?.finish_reason ?? finish;
  }
  check(text === expected && finish !== null, 'openai client: a streamed completion gives the same text');

  const chat = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Write a function' }], max_tokens: 12, temperature: 0, stream: true,
  });
  let reply = '';
  for await (const chunk of chat) reply += chunk.choices[0]?.delta?.content ?? '';
  const again = await client.chat.completions.create({
    model, messages: [{ role: 'user', content: 'Write a function' }], max_tokens: 12, temperature: 0,
  });
  check(reply === again.choices[0].message.content, 'openai client: a streamed chat equals the whole one');

  try {
    await client.completions.create({ model: 'no-such-model', prompt, max_tokens: 4 });
    check(false, 'openai client: an unknown model is refused');
  } catch (error) {
    check(error.status === 404 && /does not exist/.test(error.message), 'openai client: an unknown model is a 404 it reads');
  }
  process.exit(failures ? 1 : 0);
})().catch((error) => {
  console.log('FAIL openai client: ' + error);
  process.exit(1);
});
