package slidingsync

import (
	"bytes"
	"encoding/json"
)

// Opt keeps apart the three shapes a response field can take: absent (Set is false), an
// explicit JSON null (Set and Null), and a value (Set, Val holds it). The zero value is absent.
type Opt[T any] struct {
	Set  bool // the field was present
	Null bool // the field was an explicit null
	Val  T    // the value, when Set and not Null
}

// Some returns an Opt holding v.
func Some[T any](v T) Opt[T] { return Opt[T]{Set: true, Val: v} }

// Null returns an Opt holding an explicit null.
func Null[T any]() Opt[T] { return Opt[T]{Set: true, Null: true} }

// HasValue reports whether the field was present with a non-null value.
func (o Opt[T]) HasValue() bool { return o.Set && !o.Null }

// UnmarshalJSON records presence; encoding/json only calls it for keys that are present.
func (o *Opt[T]) UnmarshalJSON(data []byte) error {
	o.Set = true
	if bytes.Equal(bytes.TrimSpace(data), []byte("null")) {
		o.Null = true
		var zero T
		o.Val = zero
		return nil
	}
	o.Null = false
	return json.Unmarshal(data, &o.Val)
}

// MarshalJSON writes null for an explicit null or an absent value; use omitzero on the
// field to leave an absent value out.
func (o Opt[T]) MarshalJSON() ([]byte, error) {
	if !o.Set || o.Null {
		return []byte("null"), nil
	}
	return json.Marshal(o.Val)
}

// IsZero reports absence, so that `json:",omitzero"` leaves an absent field out.
func (o Opt[T]) IsZero() bool { return !o.Set }
