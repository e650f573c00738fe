"""fineweb_edu: llm200m (Llama style, ~251M parameters, block 1024, bf16) pretrained on FineWeb-Edu's 10B-token
sample (HuggingFaceFW/fineweb-edu, subset sample-10BT), a maintained substitute for BookCorpus (whose hub copy is
a loading script the datasets library no longer runs). Sized for a GPU.

  python -m minillm_jax.train --config=configs/fineweb_edu.py --workdir=runs/fineweb_edu

The rows stream from the hub (data.hub_streaming: no 28 GB download); the first 500,000 documents (about 2.5 GB
of text) are kept, and a 32,000-token BPE learns from a 100M-character sample of them. The dataset has no
validation split: 1% of the documents (by content hash) are held out."""
from minillm_jax.config import no_variant, preset_beside


def get_config(variant: str = ''):
  no_variant(variant)
  c = preset_beside(__file__, 'llm200m')
  c.data.update(corpus='hub', hub_name='HuggingFaceFW/fineweb-edu', hub_config='sample-10BT', hub_split='train',
                hub_streaming=True, text_field='text', max_docs=500_000, val_fraction=0.01, tokenizer='bpe',
                vocab_size=32000, tokenizer_train_chars=100_000_000)
  c.sample.update(prompt='The most important discovery in biology was', max_new_tokens=200, top_k=50)
  return c
