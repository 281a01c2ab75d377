# Two commands set up a fresh machine: `make demo` and `make test`. Both build .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: install browser demo test soak bench lint clean

install: $(INSTALLED)

# The wheels of demo/photo-wheels.txt are downloaded, not installed: they only carry photos (demo/photos.py).
$(INSTALLED): setup.py requirements.txt requirements-dev.txt demo/photo-wheels.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip download --quiet --no-deps --dest $(VENV)/photo-wheels -r demo/photo-wheels.txt
	touch $@

# The contact-sheet test renders pages in headless Chromium (Debian package `chromium`).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium || { \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; }; }

# Night 1 starts from no table: one left in ./lancedb by an older checkout was embedded with other encoders
# (its drift would stop the run).
demo: install
	$(BIN)/python -m demo.build_catalog data/demo
	rm -rf lancedb/demo.lance lancedb/demo_rejects.lance lancedb/demo_runs.lance
	$(BIN)/catalog-embed run --config configs/demo.yaml
	@echo; echo "== items most like the photo 'chelsea' (text 0.4, image 0.3, color 0.1, conse 0.2, behaviour 0.2) =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --like chelsea -k 5
	@echo; echo "== bought with 'chelsea' in the demo sessions (data/demo/sessions.csv), by behaviour alone =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --like chelsea --weights behaviour=1 -k 4
	@echo; echo "== for shopper 'ada' (chelsea and coffee, then rocket and moon): the mean of her items, by behaviour =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --user ada --weights behaviour=1 -k 4
	@echo; echo "== photos found by words alone, through the conse encoder (text-to-image) =="
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --text "a cat" --weights conse=1 -k 3
	@echo; echo "== zero-shot labels for two photos, through the conse encoder =="
	$(BIN)/catalog-embed classify --uri ./lancedb --table demo --encoder conse --labels "cat,cup of coffee,rocket,horse" \
	    data/demo/images/chelsea.png data/demo/images/rocket.jpg
	@echo; echo "== a contact sheet of the photos most like 'a cup of coffee' =="
	@mkdir -p out
	$(BIN)/catalog-embed query --uri ./lancedb --table demo --text "a cup of coffee" --weights conse=1 -k 8 \
	    --html out/coffee.html
	@echo; echo "== quality of each vector column: retrieval and zero-shot by the photos' categories, and text-to-image"
	@echo "   with demo/queries.csv (conse against conse_before, the class texts before definitions) =="
	$(BIN)/catalog-embed evaluate --config configs/demo.yaml --queries demo/queries.csv --out out/demo-evaluation.json
	@echo; echo "== night 2: two photos re-uploaded as new listings, two captions pasted onto each other's picture =="
	$(BIN)/python -m demo.build_catalog data/demo --night 2
	$(BIN)/catalog-embed run --config configs/demo.yaml
	@echo; echo "== catalog health: near-duplicates (the image encoder, cosine >= 0.75), also as out/duplicates.html =="
	$(BIN)/catalog-embed duplicates --uri ./lancedb --table demo --html out/duplicates.html
	@echo; echo "== captions that do not describe their picture (text against conse) =="
	$(BIN)/catalog-embed outliers --uri ./lancedb --table demo -k 4
	@echo; echo "== how night 2 moved the table from night 1 =="
	$(BIN)/catalog-embed drift --uri ./lancedb --table demo

test: install browser
	$(BIN)/python -m pytest -q tests

# 30 nights of random catalog changes on a local disk and on moto's S3 behind a fault-injecting proxy, with
# kills and racing runs, each checked against docs/safety.md (tests/soak.py; make test runs a short version).
soak: install
	$(BIN)/python -m tests.soak --nights 30 --stores local,s3

# Texts against plain loops, Beam MLTransform and the LanceDB embedding registry (benchmarks/throughput.py),
# photos against plain loops and the network's compute limit (benchmarks/photos.py), then the nightly cost
# at 10k and 100k Food-101-layout items (benchmarks/scale.py), then the health reports' duplicate threshold on real
# photos and their cost on a 1M-row table (benchmarks/health.py), then item2vec at 10k and 100k items against a
# plain gensim script (benchmarks/behaviour.py), then ConSE's settings on the development set
# (benchmarks/text_to_image.py), then queries: cold starts, --hybrid, and recall and latency on a 1M-row table
# over 30 nights (benchmarks/query.py), then CSV reading at 1M rows against the line reader (benchmarks/csv_read.py),
# then catalogs of image URLs from a local CDN stand-in against a plain requests + thread-pool loop
# (benchmarks/url_images.py), then a killed and resumed first run and a budgeted backfill at 100k items
# (benchmarks/backfill.py), then catalog-embed serve under 1 and 8 clients on a 1M-row table (benchmarks/serving.py),
# then a placeholder picture shared by 10k and 100k items against a picture each (benchmarks/shared_images.py),
# then the budget's boundary at a 1M budget over 2M items (benchmarks/budget_boundary.py), then item2vec's first run
# on 12M events over 1M items (benchmarks/behaviour.py --first-only) and recall and latency at 4M rows
# (benchmarks/query.py --rows 4000000; it needs about 70 GB of disk).
# Results: out/bench.json.
bench: install
	$(BIN)/python -m benchmarks.throughput --out out/bench.json
	$(BIN)/python -m benchmarks.photos --out out/bench.json
	$(BIN)/python -m benchmarks.photo_cpu --out out/bench.json
	$(BIN)/python -m benchmarks.gpu --out out/bench.json
	$(BIN)/python -m benchmarks.scale --out out/bench.json
	$(BIN)/python -m benchmarks.health --out out/bench.json
	$(BIN)/python -m benchmarks.behaviour --out out/bench.json
	$(BIN)/python -m benchmarks.text_to_image --out out/bench.json
	$(BIN)/python -m benchmarks.query --out out/bench.json
	$(BIN)/python -m benchmarks.csv_read --out out/bench.json
	$(BIN)/python -m benchmarks.url_images --out out/bench.json
	$(BIN)/python -m benchmarks.backfill --out out/bench.json
	$(BIN)/python -m benchmarks.serving --out out/bench.json
	$(BIN)/python -m benchmarks.shared_images --out out/bench.json
	$(BIN)/python -m benchmarks.budget_boundary --out out/bench.json
	$(BIN)/python -m benchmarks.behaviour --sizes 1000000 --first-only --out out/bench.json
	$(BIN)/python -m benchmarks.query --rows 4000000 --nights 0 --cases "default weights" "filter 1%" --table-only \
		--out out/bench.json

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) lancedb data out .pytest_cache
