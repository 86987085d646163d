"""Write the demo's data: captioned 32x32 images of the shape the built-in image model never saw (a cross).

    python examples/shapes_t2i/make_data.py        # writes train/ (48 crosses + 48 replay images) and test/ (20)

Both folders hold NNNN.png with NNNN.txt (its caption) and metadata.jsonl (file_name, text), from tunesmith's seeded
synthetic world (tunesmith.images.synth): crosses of every trained colour, size, count, position and background.
train/ also holds replay-NNNN.png: 48 scenes of the shapes and colours the model already draws (rehearsal, so the
fine-tune keeps them). The test captions come from another seed, so their scenes are not the training ones.
"""

from pathlib import Path

from tunesmith.images import synth

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    synth.write_dataset(HERE / "train", "cross", n=48, seed=0, replay=48)
    synth.write_dataset(HERE / "test", "cross", n=20, seed=1)
    print(f"wrote {HERE / 'train'} (48 crosses, 48 replay images) and {HERE / 'test'} (20 crosses)")
