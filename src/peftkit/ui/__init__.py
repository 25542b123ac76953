"""`peftkit ui`: a web console over a folder of runs and sweeps, the planner and a playground.

    peftkit ui runs/                      # http://127.0.0.1:7860
    peftkit ui runs/ --model smollm2      # the playground loads the base and the runs' adapters in process

FastAPI serves a JSON API (api_*.py) and one static page (static/: HTML, CSS and plain JavaScript that draws
its charts as inline SVG; nothing is built or fetched from elsewhere). The console only reads files under the
folder it was started on (folder.py), binds loopback unless told otherwise, and bounds every request.
"""
