"""The four OCT classes, in the label order of Kermany OCT2017 and OCTMNIST."""

CLASSES = ("CNV", "DME", "DRUSEN", "NORMAL")
NUM_CLASSES = len(CLASSES)
# Urgent referral as in Kermany et al. 2018: CNV and DME need treatment soon.
URGENT_CLASSES = ("CNV", "DME")
URGENT_LABELS = tuple(CLASSES.index(c) for c in URGENT_CLASSES)
