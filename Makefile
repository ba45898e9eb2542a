# One-command set-up, demo and tests. Everything installs into ./.venv from requirements.txt.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup orthanc demo test test-fast jobs study-smoke study-prostate study-dermoscopy study-spacing study-intensity study-plateau-prostate study-plateau-prostate-80 study-plateau-dermoscopy study-plateau-dermoscopy-80 study-headroom-prostate study-headroom-dermoscopy study-harmofl-window study-released-input study-released-protocol study-n4 study-prrfl-protocols study-prrfl-retrogress study-iopfl-unseen study-iopfl-loso study-routing-default shift-prostate-v1 shift-prostate-v2 shift-brain study-main-prostate study-main-dermoscopy study-main-prostate-v2 study-iopfl-v2-loso study-iopfl-brain-loso study-pixel-size study-pixel-size-brain study-pixel-size-v2 study-headroom-v2-augmented study-headroom-brain-augmented study-brain study-times study-queue method-guide scale bench bench-inference bench-classical bench-harmofl bench-harmonize bench-iopfl bench-dermoscopy bench-histology gpu-check gpu-carry poc-up poc-down clean

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps rt-utils==1.2.7  # RTSTRUCT; --no-deps: see requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

## demo: phantom sites -> 6-site FedAvg in the NVFlare simulator -> per-site Dice table
demo: setup
	$(BIN)/python tools/demo.py

## test: the whole pytest suite (unit + bundle + NVFlare simulator runs), in 2 pytest-xdist workers, one test file
## at a time each: federations spend much of their time waiting (heartbeats, schedulers, process starts), so two
## run side by side; the two POC files (fixed ports) are one work unit, started first (tests/conftest.py)
test: setup orthanc
	$(BIN)/python -m pytest -ra --durations=25 -n 2 --dist loadfile --no-loadscope-reorder

## orthanc: the PACS the round-trip tests run against (apt-get install orthanc orthanc-dicomweb, as root, when missing)
orthanc:
	bash tools/install_orthanc.sh

test-fast: setup
	$(BIN)/python -m pytest -ra -m "not integration" --durations=10

## jobs: export self-contained job folders (every algorithm x prostate, brain, dermoscopy, histology) to build/jobs
jobs: setup
	for task in prostate brain dermoscopy histology; do for algo in $$($(BIN)/python -c "from fedharmony.methods import METHODS; print(*METHODS)"); do \
		$(BIN)/python jobs/$$task.py --algorithm $$algo --export --export-dir build/jobs || exit 1; done; done

## study-times: how long each stored study took on this machine (a table from the committed results; nothing runs)
study-times: setup
	$(BIN)/python tools/study_times.py docs/studies

## study-queue: run the planned studies not yet finished, each on its plan's commit in a clone under QUEUE_DIR
QUEUE_DIR ?= ../study_queue
study-queue: setup
	$(BIN)/python tools/study_queue.py run --workdir $(QUEUE_DIR)

## method-guide: rewrite the README's method guide from the planned studies' stored results (docs/method_guide.json)
method-guide: setup
	$(BIN)/python tools/method_guide.py --write README.md

## study-*: methods compared over seeds with CIs and a generated report (docs/studies.md)
study-smoke: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg fedbn local pooled --seeds 2 --preset smoke --out workspace/study_smoke

study-prostate: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg fedprox fedbn harmofl iopfl prrfl local pooled --seeds 5 --preset standard --out docs/studies/prostate

study-dermoscopy: setup
	$(BIN)/python tools/study.py --task dermoscopy --methods fedavg fedbn harmofl prrfl local pooled --seeds 5 --preset standard --out docs/studies/dermoscopy

study-spacing: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg fedavg+pixdim=1.5 --seeds 5 --preset standard --out docs/studies/prostate_spacing

## study-intensity: FedAvg, FedBN, HarmoFL and FedAvg with federated histogram standardization (z-scored input, 5 seeds,
## standard preset)
study-intensity: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg fedbn harmofl fedavg+histogram_scale=federated --seeds 5 --preset standard --out docs/studies/prostate_intensity

## study-plateau-*: the round pilots: FedAvg alone, 3 seeds, long enough to see where its validation curve stops rising
## (each report's table says which round counts meet the plateau rule; the planned studies take their rounds from it)
study-plateau-prostate: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg --seeds 3 --preset standard --rounds 40 --out docs/studies/prostate_plateau

study-plateau-prostate-80: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg --seeds 3 --preset standard --rounds 80 --out docs/studies/prostate_plateau_80

study-plateau-dermoscopy: setup
	$(BIN)/python tools/study.py --task dermoscopy --methods fedavg --seeds 3 --preset standard --rounds 40 --out docs/studies/dermoscopy_plateau

study-plateau-dermoscopy-80: setup
	$(BIN)/python tools/study.py --task dermoscopy --methods fedavg --seeds 3 --preset standard --rounds 80 --out docs/studies/dermoscopy_plateau_80

## study-headroom-*: the planned headroom studies (plan.json committed before the first run; resumable)
study-headroom-prostate: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_headroom/plan.json

study-headroom-dermoscopy: setup
	$(BIN)/python tools/study.py --plan docs/studies/dermoscopy_headroom/plan.json

## study-harmofl-window: HarmoFL with an amplitude window beyond the DC term (L = 0.025 at 96 px: b = 2), planned
study-harmofl-window: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_harmofl_window/plan.json

## study-released-input: FedAvg and HarmoFL on the released 0-255 input at the released learning rate, 1e-4 (one seed:
## neither learns; at the bundle's 2e-3, FedAvg collapsed to empty masks by round 5)
study-released-input: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg+intensity=released+learning_rate=0.0001 harmofl+intensity=released+learning_rate=0.0001 --seeds 1 --preset standard --out docs/studies/prostate_released_input

## study-released-protocol: on the released input and network (0-255, batch-statistics norm, plain conv blocks), 5 seeds:
## FedAvg, HarmoFL's released protocol, HarmoFL's paper mode, FedAvg + federated histogram standardization, FedAvg + N4
RELEASED := intensity=released+norm=batch_stats_only+num_res_units=0
study-released-protocol: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg+$(RELEASED) harmofl+protocol=released harmofl+$(RELEASED) fedavg+$(RELEASED)+histogram_scale=federated fedavg+$(RELEASED)+bias_correction=true --seeds 5 --preset standard --out docs/studies/prostate_released_protocol

## study-n4: FedAvg with and without N4 bias-field correction, and HarmoFL against both (z-scored input, 5 seeds)
study-n4: setup
	$(BIN)/python tools/study.py --task prostate --methods fedavg fedavg+bias_correction=true harmofl --seeds 5 --preset standard --out docs/studies/prostate_n4

## study-prrfl-protocols: PRR-FL paper and released protocols against FedAvg and FedBN on dermoscopy (5 seeds)
study-prrfl-protocols: setup
	$(BIN)/python tools/study.py --task dermoscopy --methods fedavg fedbn prrfl prrfl+protocol=released --seeds 5 --preset standard --out docs/studies/dermoscopy_prrfl_protocols

## study-prrfl-retrogress: the same 4 arms with --retrogress: what each communication costs the model a site uses
## (and PRR-FL's deputy), with CIs over seeds and a figure
study-prrfl-retrogress: setup
	$(BIN)/python tools/study.py --task dermoscopy --methods fedavg fedbn prrfl prrfl+protocol=released --seeds 5 --preset standard --retrogress --out docs/studies/dermoscopy_prrfl_retrogress

## study-iopfl-unseen SET=N: outside study (tools/study.py --outside unseen): IOP-FL inside (6 sites) and its pool on
## 3 scanners no site has, 3 seeds, in docs/studies/iopfl_unseen[_N]/; resumable, also from the committed runs. The
## sets are study-only scanner profiles, docs/studies/unseen_scanners/setN.json:
##   SET=1 (default), with the routing sweep;
##   SET=2 fixed after the consensus safeguard was built (its test on scanners it was not designed on);
##   SET=3 fixed before the departure criterion was written (its independent test);
##   SET=4 fixed before the labelled criterion was written (its independent test, and a second one of departure)
SET ?= 1
UNSEEN_NAME = $(if $(filter 1,$(SET)),iopfl_unseen,iopfl_unseen_$(SET))
study-iopfl-unseen: setup
	$(BIN)/python tools/study.py --outside unseen --unseen-set $(SET) --seeds 3 $(if $(filter 1,$(SET)),--sweep) --out docs/studies/$(UNSEEN_NAME)

## study-iopfl-loso: outside study, IOP-FL leave-one-site-out, each of the 6 sites held out, 5 seeds (30 federations;
## resumable, also from the committed runs in docs/studies/iopfl_loso/runs/)
study-iopfl-loso: setup
	$(BIN)/python tools/study.py --outside loso --seeds 5 --out docs/studies/iopfl_loso

## study-main-prostate / study-main-dermoscopy: the README's method comparisons rerun under committed plans
## (docs/studies/{prostate,dermoscopy}_main/plan.json): 80 rounds, 10 seeds, Holm across each study's verdicts; resumable
study-main-prostate: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_main/plan.json

study-main-dermoscopy: setup
	$(BIN)/python tools/study.py --plan docs/studies/dermoscopy_main/plan.json

## study-main-prostate-v2: prostate phantom v2's headroom and methods under a committed plan
## (docs/studies/prostate_v2_main/plan.json)
study-main-prostate-v2: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_v2_main/plan.json

## study-iopfl-v2-loso: IOP-FL routing against the global model on two held-out prostate v2 scanners, under a
## committed plan (docs/studies/iopfl_v2_loso/plan.json)
study-iopfl-v2-loso: setup
	$(BIN)/python tools/study.py --plan docs/studies/iopfl_v2_loso/plan.json

## study-iopfl-brain-loso: the same on the brain phantom, HH and IOP held out (docs/studies/iopfl_brain_loso/plan.json)
study-iopfl-brain-loso: setup
	$(BIN)/python tools/study.py --plan docs/studies/iopfl_brain_loso/plan.json

## study-pixel-size: the spatial augmentation against the recipe before it, scored at 0.6x to 1.5x the test scans'
## pixel size, under a committed plan (docs/studies/prostate_pixel_size/plan.json)
study-pixel-size: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_pixel_size/plan.json

## study-pixel-size-brain: the same on the brain phantom (docs/studies/brain_pixel_size/plan.json)
study-pixel-size-brain: setup
	$(BIN)/python tools/study.py --plan docs/studies/brain_pixel_size/plan.json

## study-pixel-size-v2: the same on prostate phantom v2, voxels twice the profiles' (docs/studies/prostate_v2_pixel_size/plan.json)
study-pixel-size-v2: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_v2_pixel_size/plan.json

## study-headroom-v2-augmented: prostate v2's headroom arms with the bundle's training default since 0.14.0
## (docs/studies/prostate_v2_headroom_augmented/plan.json)
study-headroom-v2-augmented: setup
	$(BIN)/python tools/study.py --plan docs/studies/prostate_v2_headroom_augmented/plan.json

## study-headroom-brain-augmented: the same on the brain phantom (docs/studies/brain_headroom_augmented/plan.json)
study-headroom-brain-augmented: setup
	$(BIN)/python tools/study.py --plan docs/studies/brain_headroom_augmented/plan.json

## study-brain: the brain phantom's headroom and methods under a committed plan (docs/studies/brain_main/plan.json)
study-brain: setup
	$(BIN)/python tools/study.py --plan docs/studies/brain_main/plan.json

## shift-prostate-v1: what separates the phantom prostate sites before training (stored and after the bundle's
## preprocessing): intensity distance, low-frequency amplitude, a site classifier; docs/studies/shift_prostate_v1/
shift-prostate-v1: setup
	[ -f data/prostate_v1_seed0/sites.json ] || $(BIN)/python tools/make_phantom_sites.py --out data/prostate_v1_seed0 --cases 10 --size 96 --seed 0
	$(BIN)/python tools/measure_shift.py --data data/prostate_v1_seed0 --out docs/studies/shift_prostate_v1 --override '{"image_size": 96}' --title "prostate phantom v1, the standard study sites (seed 0)"

## shift-brain: the same on the brain phantom (MNI152 anatomy, three IXI-like scanners), the standard study's sites
shift-brain: setup
	[ -f data/brain_seed0/sites.json ] || $(BIN)/python tools/make_phantom_sites.py --phantom brain --out data/brain_seed0 --voxel-scale 2 --seed 0
	$(BIN)/python tools/measure_shift.py --data data/brain_seed0 --bundle bundles/brain_mri_seg --out docs/studies/shift_brain --override '{"image_size": 96}' --title "brain phantom (MNI152, IXI-like scanners), the standard study's three sites (seed 0)"

## shift-prostate-v2: the same on prostate phantom v2 (anatomy in mm scanned by the MR physics simulator), seed 0
shift-prostate-v2: setup
	[ -f data/prostate_v2_seed0/sites.json ] || $(BIN)/python tools/make_phantom_sites.py --phantom v2 --out data/prostate_v2_seed0 --cases 10 --seed 0
	$(BIN)/python tools/measure_shift.py --data data/prostate_v2_seed0 --out docs/studies/shift_prostate_v2 --override '{"image_size": 96}' --title "prostate phantom v2 (MR physics), six sites x 10 cases (seed 0)"

## study-routing-default: the planned test of routed inference's default (docs/studies/routing_default/plan.json):
## the candidate chosen on the five IOP-FL outside studies, and the runner-up, against the global model on six fresh
## scanners, every-scanner non-inferiority (margin 3 Dice points), 9 seeds with new federations; resumable
study-routing-default: setup
	$(BIN)/python tools/study.py --plan docs/studies/routing_default/plan.json

## bench-inference: inference seconds per volume and peak memory, plain / HarmoFL / routed, 96 and 384 in-plane
bench-inference: setup
	$(BIN)/python tools/benchmark_inference.py

## bench-classical: seconds per volume of N4 and histogram standardization against the z-score, 96 and 384 in-plane
bench-classical: setup
	$(BIN)/python tools/benchmark_classical_harmonization.py

## scale: time and memory against the number of sites and the image size
scale: setup
	$(BIN)/python tools/study.py --scale --out workspace/scale

## bench: FedAvg / FedProx / FedBN on the 6 phantom sites (Dice, time per round, peak memory)
bench: setup
	$(BIN)/python tools/benchmark_federation.py

## bench-harmofl: FedAvg, FedBN, HarmoFL (paper, released) and the two ablations, all at 96 x 96
bench-harmofl: setup
	$(BIN)/python tools/benchmark_federation.py --suite harmofl

## bench-harmonize: amplitude normalization speed (CPU; GPU where present) and bytes per round
bench-harmonize: setup
	$(BIN)/python tools/benchmark_harmonize.py

## gpu-check: on a GPU (cuda where present, else cpu), the cupy and torch AmpNorm paths, paper-size training steps,
## routed inference and a 3-site federation, timed, into workspace/gpu_check (tools/gpu_check.py; on a lent GPU machine
## run the command in docs/performance.md instead); GPU_CHECK_ARGS='--device cpu --tiny' for the small CPU run
gpu-check: setup
	$(BIN)/python tools/gpu_check.py $(GPU_CHECK_ARGS)

## gpu-carry: the wheels a lent GPU machine lacks for gpu-check, into .whl/ (git-ignored; tools/gpu_carry.sh)
gpu-carry:
	bash tools/gpu_carry.sh

## bench-iopfl: one seed of IOP-FL leave-one-site-out (every test-time method on each held-out site), in workspace/iopfl
bench-iopfl: setup
	$(BIN)/python tools/study.py --outside loso --seeds 1 --out workspace/iopfl

## bench-dermoscopy: FedAvg, FedBN, HarmoFL, PRR-FL on the 4 phantom dermoscopy sources (accuracy, macro-F1, AUC, retrogress)
bench-dermoscopy: setup
	$(BIN)/python tools/benchmark_classification.py --task dermoscopy

## bench-histology: FedAvg vs HarmoFL on the 5 phantom histology hospitals
bench-histology: setup
	$(BIN)/python tools/benchmark_classification.py --task histology

## poc-up / poc-down: a real federation on this machine (NVFlare POC: server + 6 site processes), isolated in workspace/poc
poc-up: setup
	$(BIN)/python tools/poc.py up --sites 6 --data-root workspace/data/prostate

poc-down: setup
	$(BIN)/python tools/poc.py down

clean:
	rm -rf build workspace .pytest_cache
