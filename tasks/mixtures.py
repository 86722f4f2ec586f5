"""Task mixtures: {mixture: {task: {"train": examples, "test": examples}}}. None means all.

`demo` is sized for about 20 minutes on 2 CPU cores (data, training and evaluation together);
`full` uses every example the sources offer.
"""

ALL_TASKS = ("fashion", "digits", "spoken_digits", "av_digits", "moving_digits", "captions", "zero_shot", "vqa",
             "text_topic", "tabular", "table_image")

MIXTURES = {
    "demo": {
        "fashion": {"train": 6000, "test": 500},
        "digits": {"train": 4000, "test": 500},
        "spoken_digits": {"train": 1620, "test": 500},
        "av_digits": {"train": 3000, "test": 300},
        "moving_digits": {"train": 4000, "test": 300},
        "captions": {"train": None, "test": None},
        "zero_shot": {"train": 0, "test": 500},
        "vqa": {"train": 6000, "test": 500},
        "text_topic": {"train": None, "test": 500},
        "tabular": {"train": None, "test": None},
        "table_image": {"train": 4000, "test": 300},
    },
    "full": {name: {"train": None, "test": None} for name in ALL_TASKS},
}
