// A user's script, unmodified by tracer: the official `ollama` npm package streaming
// /api/generate (or /api/chat with TARGET_ENDPOINT=chat), interrupted with abort() after
// 300 ms, then asked again. (Breaking out of the `for await` alone does not cancel the request.)
import { Ollama } from 'ollama'

const model = process.argv[2] ?? 'tracer-llama:test'
const host = process.env.OLLAMA_HOST ?? 'http://127.0.0.1:11434'
const ollama = new Ollama({ host: host.includes('://') ? host : `http://${host}` })
const chat = process.env.TARGET_ENDPOINT === 'chat'
const ask = (prompt, options) => chat
  ? ollama.chat({ model, messages: [{ role: 'user', content: prompt }], stream: true, options })
  : ollama.generate({ model, prompt, stream: true, options })

for (let i = 0; i < Number(process.env.TARGET_ITERATIONS ?? 3); i++) {
  const started = Date.now()
  const stream = await ask('tell me a long story', {})
  try {
    for await (const _part of stream) {
      if (Date.now() - started > 300) { stream.abort(); break }
    }
  } catch (err) {
    if (err.name !== 'AbortError') throw err
  }
  for await (const _part of await ask('and another', { num_predict: 4 })) { /* to the end */ }
}
