"""Evaluation and training data: TFDS builders for the official files, read without TensorFlow.

The builders write array_record files and are read with `as_data_source`, so
TensorFlow never becomes a dependency. `load_xor_tydi` and
`load_xquad_r` are the entry points the rest of the project calls.
"""
