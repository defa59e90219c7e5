"""The engines that answer chat calls: the one chat interface, where each role's calls go (routes
and keys), the factory that names engines, the local transformers engine, the OpenAI-compatible
client, the seq2seq engine, sampling, and the embedded model's place."""
