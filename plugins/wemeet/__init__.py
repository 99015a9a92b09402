"""Tencent Meeting (腾讯会议 / WeMeet) third-party OAuth apps: provider plugin, page bridge, emulator."""
