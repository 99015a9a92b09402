"""The DingTalk (钉钉) provider plugin: ``provider.py``, ``bridge.js``, ``sandbox.py``, ``crypto.py``."""
