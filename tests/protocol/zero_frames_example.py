"""docs/PROTOCOL.md section 3, "Example with zero frames", copied from the document once for the two suites the
document names as checking it: vmcast's (tests/protocol/test_zero_frames.py) and the independent peer's
(tests/interop/test_interop_zero_frames.py). Each suite still asserts that this copy is the document's."""

# 147 bytes in frames of 16 and blocks of 64: block 1 (frames 4-7) is all zeros (`zero`), and frames 1, 2 and 8
# are all-zero frames of blocks that are not (`zero_frames`); only frames 0, 3 and 9 are sent.
EXAMPLE = b"vmcast zero fram" + bytes(32) + b"es, not blocks!\n" + bytes(80) + b"end"
EXAMPLE_JSON = (
    '{"block":64,"format":"raw","frame":16,"len":147,"name":"frames.raw",'
    '"sha1":"be0f317642f41e6ee1ff742ee4b335cd8392276d","v":1,'
    '"xxh3":{"first":0,"sums":["4e5a5702697cf3e0","2ffb6918c12c256e","c851794bc503c3bb"]},'
    '"zero":[[1,1]],"zero_frames":[[1,2],[8,1]]}'
)
