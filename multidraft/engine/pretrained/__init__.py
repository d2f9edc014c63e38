"""The (to be) shipped target/draft pair: byte-level GPTs trained on the Python standard
library's source (corpus.py, train.py).  The weights are not trained or shipped yet."""
