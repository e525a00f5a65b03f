"""`tunesmith web-ui`: the server (app) and the page it serves (web/)."""
