"""rvc_pipeline: the RVC training recipe as pure steps with a thin I/O shell."""
