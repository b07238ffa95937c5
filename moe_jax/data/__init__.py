"""Data pipeline: sources -> SentencePiece -> packed windows -> grain batches.

  sources.py    documents from text / JSON-lines / Parquet / ArrayRecord
                files, TFDS, or the built-in synthetic multi-domain corpus
  tokenizer.py  train, cache or load a SentencePiece BPE model
  pipeline.py   tokenize, pack into S+1 windows, shuffle, per-process batches

Typical use (the fields of `config.data` are the keyword arguments):

  source = sources.make_source('synthetic')            # or 'parquet', ...
  tok = tokenizer.load_or_train_tokenizer(workdir=workdir, texts=source)
  pipe = pipeline.build_pipeline(source, tok, seq_len=1024,
                                 global_batch_size=64, valid_windows=1008,
                                 cache_dir=workdir)
  it = pipe.train_iterator(state=restored_state)        # state: it.get_state()
  batch = next(it)     # {'inputs': [B, S] int32, 'targets': [B, S] int32}
"""
