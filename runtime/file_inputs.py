"""The inputs of a model file benchmarked without a recipe: from `--input name=dims:dtype`, from the
`<file>.io.json` a run writes beside each export, or from an ONNX graph's declared inputs."""
from __future__ import annotations

from pathlib import Path

from core.errors import RecipeError
from core.model import ModelIO

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32"}


def load_onnx(path: Path):
    """An ONNX Runtime CPU session of the file, or a RecipeError in ORT's own words for what it is not."""
    from core.errors import one_line
    from runtime.sessions import onnx_session

    try:
        return onnx_session(path)
    except Exception as e:  # noqa: BLE001 - a CSV named .onnx, a truncated file, an op this ORT lacks
        raise RecipeError(f"MODEL_FILE {str(path)!r}: not an ONNX model ONNX Runtime can load ({one_line(e, 300)})") \
            from None


def io_from_onnx(path: Path, sess=None) -> ModelIO:
    """Symbolic first dimension -> batch, other symbolic dimensions -> seq. Integer inputs named like
    masks get ones; other integer inputs (token ids) get values below 1000, valid in any vocabulary."""
    sess = sess or load_onnx(path)
    inputs = {}
    for i in sess.get_inputs():
        if i.type not in ORT_TYPES:
            raise RecipeError(f"{path}: input {i.name!r} has type {i.type}; supported: {sorted(ORT_TYPES)}")
        dims = []
        for k, d in enumerate(i.shape):
            dims.append(d if isinstance(d, int) else ("batch" if k == 0 else "seq"))
        dtype = ORT_TYPES[i.type]
        spec = {"shape": dims, "dtype": dtype}
        if dtype.startswith("int"):
            spec.update(low=1, high=2) if "mask" in i.name else spec.update(low=0, high=1000)
        inputs[i.name] = spec
    return ModelIO(inputs=inputs, kind="embedding", output=sess.get_outputs()[0].name)


def parse_input(text: str) -> tuple[str, dict]:
    """`name=batch,3,224,224:float32` -> ("name", {"shape": [...], "dtype": ...})."""
    try:
        name, rest = text.split("=", 1)
        dims, _, dtype = rest.partition(":")
        shape = [d if d in ("batch", "seq") else int(d) for d in dims.split(",")]
    except ValueError:
        raise RecipeError(f"--input {text!r}: expected name=dims:dtype, e.g. pixels=batch,3,224,224:float32") from None
    dtype = dtype or "float32"
    if dtype not in ("float32", "float16", "int64", "int32"):
        raise RecipeError(f"--input {text!r}: dtype {dtype!r}; accepted: float32, float16, int64, int32")
    return name, {"shape": shape, "dtype": dtype, "low": 0, "high": 2}


def model_io(path: Path, inputs: list[str] | None, sess=None) -> ModelIO:
    """`sess`: the file's ONNX Runtime session where the caller has one already (it is not loaded twice)."""
    if inputs:
        return ModelIO(inputs=dict(parse_input(t) for t in inputs), kind="embedding")
    sidecar = path.with_name(path.name + ".io.json")
    if sidecar.exists():
        import json

        return ModelIO.from_json(json.loads(sidecar.read_text()))
    if path.suffix == ".onnx":
        return io_from_onnx(path, sess)
    raise RecipeError(f"{path}: a TorchScript or .pt2 file declares no input shapes; give --input name=dims:dtype "
                      f"(e.g. --input pixels=batch,1,8,8:float32)")
