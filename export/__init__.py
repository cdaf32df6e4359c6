"""Export pipeline, installed as `medico_peft.export`: fuse adapters, ONNX with a parity gate, TensorRT engines."""
