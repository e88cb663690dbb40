"""The rows ``fpxint eval`` can build and its default MMLU budget: plain constants, so that the command line can
parse and check its arguments without importing torch or transformers."""

ROW_KINDS = ("fp", "rtn", "t1", "t2", "rtn2x", "t3")
DEFAULT_MMLU_LIMIT = 2
