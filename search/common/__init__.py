"""What the search and the submission both need: study records and storage, the kept-model
store, pacing, defaults and config."""
