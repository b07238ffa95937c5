"""Data pipeline: sources -> SentencePiece -> packed windows -> grain batches.

  sources.py      documents from text / JSON-lines / Parquet / ArrayRecord
                  files, TFDS, or the built-in synthetic multi-domain corpus
  tokenizer.py    load a SentencePiece model, or train a BPE one and cache
                  it in the workdir
  pipeline.py     tokenize (cached on disk), pack into S+1 windows, shuffle,
                  per-process batches
  from_config.py  build_data(config, workdir): all of the above from
                  `config.data`; the only module that knows config fields

Typical use without a config (errors name these arguments):

  source = sources.make_source('synthetic')            # or 'parquet', ...
  tok = tokenizer.train_or_reuse_tokenizer(workdir, source, vocab_size=8000)
  # or: tok = tokenizer.load_tokenizer('/path/to/existing.model')
  pipe = pipeline.build_pipeline(source, tok, seq_len=1024,
                                 global_batch_size=64, valid_windows=1008,
                                 cache_dir=workdir)
  it = pipe.train_iterator(state=restored_state)        # state: it.get_state()
  batch = next(it)     # {'inputs': [B, S] int32, 'targets': [B, S] int32}
"""
