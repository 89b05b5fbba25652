"""Label Studio 1.23.2's media paths: the only paths the backend sends Label Studio's token to when it fetches a
task image (issue 20, item 7). Any other path of Label Studio (its API above all) gets no token: a task whose
image is "/api/projects/" must not make the backend read the API with its credentials.

From label_studio's URL tables (data_import/urls.py, io_storages/urls.py):

    data/upload/<path:filename>                    uploaded files
    storage-data/uploaded/?filepath=...            uploads kept in the default cloud storage
    data/local-files/?d=...                        local files storage
    tasks/<int:task_id>/resolve/?fileuri=...       cloud storage URIs, resolved (proxied or redirected)
    tasks/<int:task_id>/presign/?fileuri=...       the same, the older name
    projects/<int:project_id>/resolve/?fileuri=...
    projects/<int:project_id>/presign/?fileuri=...

Label Studio may be served under a path prefix (LABEL_STUDIO_URL=http://host/ls): base_path is that prefix.
"""

from __future__ import annotations

import posixpath
import re
from urllib.parse import unquote

_MEDIA = re.compile(r"/(data/upload/[^?#]+|storage-data/uploaded/|data/local-files/?|"
                    r"(tasks|projects)/[0-9]{1,19}/(resolve|presign)/?)")


def is_media_path(path: str, base_path: str = "") -> bool:
    """Whether `path` (a URL's path, without query) is one of Label Studio's media paths under `base_path`.
    Percent-escapes and dot segments are resolved first, so "/data/upload/../../api/projects/" is not one."""
    if not isinstance(path, str):
        return False
    decoded = unquote(path)
    if "\\" in decoded or "\x00" in decoded:
        return False
    normal = posixpath.normpath(decoded) + ("/" if decoded.endswith("/") and decoded != "/" else "")
    if normal.startswith("//"):
        return False
    base = "/" + base_path.strip("/") if base_path.strip("/") else ""
    if base:
        if not normal.startswith(base + "/"):
            return False
        normal = normal[len(base):]
    return _MEDIA.fullmatch(normal) is not None
