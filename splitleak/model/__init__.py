"""The torch side: the model zoo and its split points (`zoo`), training (`train`, with the objectives in
`objectives` and the checkpoint format in `checkpoint`), export to ONNX (`export`) and the inverse network that
attacker and defender share (`inverse`). Imports the shared core, never a role."""
