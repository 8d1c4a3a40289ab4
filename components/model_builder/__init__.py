"""The model builder: healthy data in, a signed, ready-to-deploy ONNX model component out.

The only place scikit-learn, skl2onnx and onnx are imported; the detector never imports this package.
"""
